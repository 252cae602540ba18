"""Indexed shards: an image data set as a few large files with random access by sample index.

Written by `sparse-mae prepare` (sparse_mae/apps/prepare.py), read by `data=shards`. A shard
folder holds:

- `manifest.json`: format and version, the prepare options, the class names (labelled data)
  or null, per shard its name, sample count, data size, the SHA-256 of its index and of its
  sources, and the data set's fingerprint (its records, their checks and the identity:
  sparse_mae/data/manifest.py);
- `shard-NNNNN.data`: the samples' image bytes, one after the other (JPEG from image folders;
  lossless grey PNG from the Fashion-MNIST idx files: the manifest's options.encoding);
- `shard-NNNNN.index.npy`: one row per sample: byte offset and length in the data file, the
  label (-1 unlabelled) and a 64-bit BLAKE2b checksum of (label, image bytes);
- `shard-NNNNN.names.txt`: each sample's source (file path, or idx file[index]), one escaped
  name a line (sparse_mae/data/filenames.py), read only to name a damaged sample.

Why a format of our own (measured in docs/data.md): the reader needs random access by
sample index (so the per-sample seeds, the resumable sampler, DDP sharding and the bit-exact
resume work unchanged) and a per-sample checksum (so a damaged shard costs only its bad
samples and never serves a wrong image or label). Tar-based indexes (webdataset's `wids`)
have random access but only tar-header checksums, nothing over the contents.

Opening a folder checks its manifest (a fault refuses the folder, exit 2) and each shard's
index against the manifest's record of it: a shard whose index differs (another
preparation's, edited, damaged, missing) is left out, named in a warning, never read. Then a
sample whose bytes are out of the data file (truncated shard), whose checksum does not match
(flipped byte, index rows forged to match the manifest) or that fails to decode is replaced
by the next good sample (deterministic, as sparse_mae.data.imagefolder does with unreadable
files), named in a warning once per process, and counted in the item's "skipped".
"""
from __future__ import annotations

import hashlib
import os
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from sparse_mae.data.manifest import ManifestError, ShardMismatch, check_shard, prepare_again, read_manifest


NEWLINE = b"\n"


def sample_checksum(label: int, data: bytes | memoryview) -> int:
    """64-bit BLAKE2b of (label, bytes): a flipped bit in either the image or its label shows."""
    h = hashlib.blake2b(int(label).to_bytes(4, "little", signed=True), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little")


class ShardReader:
    """Random access to the samples of a shard folder: `read(i)` -> (label, image bytes) or an
    error string. Files are opened lazily, once per process (DataLoader workers included)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)  # checked: types, ranges, inner agreement
        self.classes: list[str] | None = self.manifest["classes"]
        # each shard against the manifest's record of it; one that disagrees is left out by name
        self.shards, self.indexes, self.data_sizes, self.skipped_shards = [], [], [], []
        for record in self.manifest["shards"]:
            try:
                rows, data_size = check_shard(self.root, record, self.classes)
            except ShardMismatch as why:
                self.skipped_shards.append(record["name"])
                warnings.warn(f"{record['name']} of {self.root}: {why}; its {record['count']} samples are left "
                              f"out. To use them, {prepare_again(self.root, self.manifest['source'])}",
                              stacklevel=2)
                continue
            if data_size != record["data_bytes"]:
                warnings.warn(f"{record['name']}.data of {self.root} is {data_size} bytes, its record says "
                              f"{record['data_bytes']} (truncated or replaced): its samples are checked one by "
                              f"one as they are read", stacklevel=2)
            self.shards.append(record["name"])
            self.indexes.append(rows)
            self.data_sizes.append(data_size)
        if not self.shards:
            raise ManifestError(f"no shard of {self.root} matches its manifest (each is named above); "
                                f"{prepare_again(self.root, self.manifest['source'])}")
        self.starts = np.concatenate([[0], np.cumsum([len(rows) for rows in self.indexes])]).astype(np.int64)
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        shard = bisect_right(self.starts, i) - 1
        return shard, i - int(self.starts[shard])

    def name(self, i: int) -> str:
        """Sample i as `shard-NNNNN sample K (its source)`: names.txt holds one escaped name a line
        (sparse_mae/data/filenames.py), so a name never spans two lines."""
        shard, local = self.locate(i)
        where = f"{self.shards[shard]} sample {local}"
        try:
            with open(self.root / f"{self.shards[shard]}.names.txt", "rb") as f:
                for n, line in enumerate(f):
                    if n == local:
                        return f"{where} ({line.rstrip(NEWLINE).decode('utf-8', 'backslashreplace')})"
        except OSError:
            pass
        return where

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.root / f"{self.shards[shard]}.data", "rb")
        return f

    def read(self, i: int) -> tuple[int, bytes] | str:
        """-> (label, bytes), or why sample i cannot be used."""
        shard, local = self.locate(i)
        row = self.indexes[shard][local]
        offset, length, label = int(row["offset"]), int(row["length"]), int(row["label"])
        try:  # never more than the data file held when it was opened, whatever the row says
            data = os.pread(self._file(shard).fileno(), min(length, max(0, self.data_sizes[shard] - offset)), offset)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        if len(data) != length:
            return f"the data file ends early ({len(data)} of {length} bytes at offset {offset}: truncated)"
        if sample_checksum(label, data) != int(row["checksum"]):
            return "checksum mismatch (damaged bytes or index)"
        return label, data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():
            self.close()

    def __getstate__(self):  # open files stay behind when a DataLoader worker is spawned
        return {**self.__dict__, "_files": {}}


class ShardDataset(Dataset):
    """The samples of a shard folder under one bad-sample policy (as ImageFilesDataset): items
    are requested as (index, seed) and returned as {"image": uint8 (3, size, size), "seed",
    "skipped"} (+ "label" when `labelled`); `transform(jpeg bytes, seed)` makes the image
    (sparse_mae.data.decode).

    With data.decode=gpu the transform returns a dict instead (sparse_mae.data.gpu_decode:
    the bytes, crop box and flip), which goes into the item with the sample's "index"; then
    `cpu_transform` is the CPU path, used for a sample the GPU cannot decode."""

    def __init__(self, root: str | os.PathLike, transform, labelled: bool = False, classes: list[str] | None = None,
                 cpu_transform=None):
        self.reader = ShardReader(root)
        self.transform = transform
        self.cpu_transform = cpu_transform
        self.labelled = labelled
        self.empty_files: list = []
        self._warned: set[int] = set()
        self.label_map = None
        if labelled:
            own = self.reader.classes
            if not own:
                raise ValueError(f"{self.reader.root} holds no labels: prepare it from ImageNet-style class "
                                 f"folders (src/<class>/*.jpg) or from the Fashion-MNIST idx files")
            self.classes = list(classes) if classes is not None else list(own)
            extra = sorted(set(own) - set(self.classes))
            if extra:
                raise ValueError(f"{self.reader.root} has classes {extra} that the training split lacks")
            self.label_map = np.array([self.classes.index(c) for c in own], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.reader)

    def read(self, index: int, seed: int, transform=None):
        """-> (transformed image, label, samples skipped to reach it)."""
        from PIL import Image, UnidentifiedImageError

        transform = transform or self.transform
        n = len(self.reader)
        for skipped in range(n):
            at = (index + skipped) % n
            got = self.reader.read(at)
            if not isinstance(got, str):
                label, data = got
                try:
                    return transform(data, seed), label, skipped
                except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                    got = f"undecodable: {type(e).__name__}: {e}"
            if at not in self._warned:
                self._warned.add(at)
                warnings.warn(f"skipping damaged sample {self.reader.name(at)} of {self.reader.root}: {got}",
                              stacklevel=1)
        raise RuntimeError(f"no sample of {self.reader.root} could be read ({n} tried)")

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, label, skipped = self.read(index, seed)
        if isinstance(image, dict):  # data.decode=gpu: decoded later, on the device
            out = {**image, "index": (index + skipped) % len(self.reader), "seed": seed, "skipped": skipped}
        else:
            out = {"image": image, "seed": seed, "skipped": skipped}
        if self.labelled:
            out["label"] = int(self.label_map[label])
        return out

    def decode_on_cpu(self, index: int, seed: int) -> tuple[object, int | None, int]:
        """The CPU path for sample `index` (data.decode=gpu's fallback): (uint8 image, label or
        None, samples skipped to reach one that decodes), with the same seed-drawn crop."""
        image, label, skipped = self.read(index, seed, self.cpu_transform)
        return image, (int(self.label_map[label]) if self.labelled else None), skipped
