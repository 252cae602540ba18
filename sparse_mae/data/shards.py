"""Indexed shards: an image data set as a few large files with random access by sample index.

Written by `sparse-mae prepare` (sparse_mae/apps/prepare.py), read by `data=shards`. A shard
folder holds:

- `manifest.json`: format and version, the prepare options, the class names (labelled data)
  or null, and per shard its name, sample count, data size and the SHA-256 of its index;
- `shard-NNNNN.data`: the samples' image bytes, one after the other (JPEG from image folders;
  lossless grey PNG from the Fashion-MNIST idx files: the manifest's options.encoding);
- `shard-NNNNN.index.npy`: one row per sample: byte offset and length in the data file, the
  label (-1 unlabelled) and a 64-bit BLAKE2b checksum of (label, image bytes);
- `shard-NNNNN.names.txt`: each sample's source (file path, or idx file[index]), read only to name a
  damaged sample.

Why a format of our own (measured in docs/data.md): the reader needs random access by
sample index (so the per-sample seeds, the resumable sampler, DDP sharding and the bit-exact
resume work unchanged) and a per-sample checksum (so a damaged shard costs only its bad
samples and never serves a wrong image or label). Tar-based indexes (webdataset's `wids`)
have random access but only tar-header checksums, nothing over the contents.

A sample whose bytes are out of the data file (truncated shard), whose checksum does not
match (flipped byte, damaged index) or that fails to decode is replaced by the next good
sample (deterministic, as sparse_mae.data.imagefolder does with unreadable files), named in
a warning once per process, and counted in the item's "skipped".
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

FORMAT = "sparse-mae-shards"
VERSION = 1
MANIFEST = "manifest.json"
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u4"), ("label", "<i4"), ("checksum", "<u8")])


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def sample_checksum(label: int, data: bytes | memoryview) -> int:
    """64-bit BLAKE2b of (label, bytes): a flipped bit in either the image or its label shows."""
    h = hashlib.blake2b(int(label).to_bytes(4, "little", signed=True), digest_size=8)
    h.update(data)
    return int.from_bytes(h.digest(), "little")


def read_manifest(root: str | os.PathLike) -> dict:
    root = Path(root).expanduser()
    path = root / MANIFEST
    if not path.is_file() and (root / "prepare.json").is_file():
        raise ValueError(f"{root} is an unfinished `sparse-mae prepare` (interrupted?): continue it with the "
                         f"same command, then train")
    if not path.is_file() and (root / "train" / MANIFEST).is_file():
        raise FileNotFoundError(f"data.root={root} holds train/ and val/ shard folders (the fine-tuning layout); "
                                f"pretraining reads one of them: data.root={root / 'train'}")
    if not path.is_file():
        hint = (f"; it is an image folder: use data=imagefolder, or turn it into shards with "
                f"`sparse-mae prepare src={root} out=<shard folder>`" if root.is_dir() else "")
        raise FileNotFoundError(f"data.root={root} has no {MANIFEST}: not a shard folder written by "
                                f"`sparse-mae prepare`{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); run `sparse-mae prepare` again with out={root} "
                         f"(completed shards are kept)") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest (format {manifest.get('format')!r}, "
                         f"version {manifest.get('version')!r}); prepare it again with this version")
    if not manifest.get("complete"):
        raise ValueError(f"{root} is an unfinished `sparse-mae prepare` (interrupted?): continue it with "
                         f"the same command, then train")
    return manifest


def load_index(path: Path, count: int) -> np.ndarray | None:
    """The index rows of one shard, or None when the file is missing or not `count` rows."""
    try:
        rows = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if rows.dtype != INDEX_DTYPE or rows.shape != (count,):
        return None
    return rows


class ShardReader:
    """Random access to the samples of a shard folder: `read(i)` -> (label, image bytes) or an
    error string. Files are opened lazily, once per process (DataLoader workers included)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.manifest = read_manifest(self.root)
        self.shards = [s["name"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.classes: list[str] | None = self.manifest.get("classes")
        self.indexes = [load_index(self.root / f"{n}.index.npy", c) for n, c in zip(self.shards, counts)]
        self._files: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        shard = bisect_right(self.starts, i) - 1
        return shard, i - int(self.starts[shard])

    def name(self, i: int) -> str:
        shard, local = self.locate(i)
        where = f"{self.shards[shard]} sample {local}"
        try:
            with open(self.root / f"{self.shards[shard]}.names.txt", encoding="utf-8") as f:
                for n, line in enumerate(f):
                    if n == local:
                        return f"{where} ({line.rstrip(chr(10))})"
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
        rows = self.indexes[shard]
        if rows is None:
            return f"the index {self.shards[shard]}.index.npy is missing or damaged"
        row = rows[local]
        offset, length, label = int(row["offset"]), int(row["length"]), int(row["label"])
        try:
            data = os.pread(self._file(shard).fileno(), length, offset)
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
