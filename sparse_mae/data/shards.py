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
preparation's, edited, damaged, missing) is left out by the reader, named in a warning, never
read; a run refuses such a split at start-up (`ShardSource.check`, before the first step), as
it does a shard whose data file is missing or shorter than its index says. A sample whose
checksum does not match (flipped byte, index rows forged to match the manifest), whose bytes
are out of the data file (cut short while the run reads it) or that fails to decode is
skipped, replaced and counted by the one damaged-sample policy of sparse_mae.data.dataset.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from bisect import bisect_right
from pathlib import Path

import numpy as np

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
        self.skipped_why: dict[str, str] = {}  # a left-out shard's name -> why
        for record in self.manifest["shards"]:
            try:
                rows, data_size = check_shard(self.root, record, self.classes)
            except ShardMismatch as why:
                self.skipped_shards.append(record["name"])
                self.skipped_why[record["name"]] = str(why)
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


class ShardSource:
    """A shard folder as a source of sparse_mae.data.dataset: `read(i)` -> (JPEG or PNG bytes,
    label) or why sample i is damaged. `labelled`: the split must have labels, numbered as
    `classes` (the training split's, so val uses its class indices) or as its own."""

    REPAIR = "copy the shard folder again, or run `sparse-mae prepare` again with the same src and out"

    def __init__(self, root: str | os.PathLike, labelled: bool = False, classes: list[str] | None = None):
        self.reader = ShardReader(root)
        self.labelled = labelled
        self.empty_files: list = []
        self.classes: list[str] | None = None
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

    def describe(self) -> str:
        return f"the {len(self)} samples of the shard folder {self.reader.root}"

    def name(self, i: int) -> str:
        return f"{self.reader.name(i)} of {self.reader.root}"

    def read(self, i: int) -> tuple[bytes, int] | str:
        got = self.reader.read(i)
        if isinstance(got, str):
            return got
        label, data = got
        return data, (int(self.label_map[label]) if self.label_map is not None else -1)

    def check(self) -> None:
        """Every shard the manifest lists there, matching its record, and its data file as long
        as its index says: a shard left out (missing, another preparation's, damaged index) or
        a cut-short file is a copy that did not finish, refused at start-up rather than met at
        the first evaluation. (Damaged bytes inside a file are found when read: skipped and
        counted.)"""
        root = self.reader.root
        problems = [f"{name} is left out: {why}" for name, why in self.reader.skipped_why.items()]
        for name, rows, size in zip(self.reader.shards, self.reader.indexes, self.reader.data_sizes):
            needed = int((rows["offset"] + rows["length"]).max()) if len(rows) else 0
            if size < needed:
                problems.append(f"{name}.data is cut short ({size} of {needed} bytes)")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"the shard folder {root} is incomplete: {shown}. {self.REPAIR[0].upper()}"
                             f"{self.REPAIR[1:]}")
        if len(self) == 0:
            raise ValueError(f"the shard folder {root} holds no samples; prepare it from a folder with images")
