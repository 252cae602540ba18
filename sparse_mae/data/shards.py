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

A shard whose files are missing or shorter than its index says is refused when the split is
opened (`ShardSource.check`, before the first step). A sample whose checksum does not match
(flipped byte, damaged index), whose bytes are out of the data file (cut short while the run
reads it) or that fails to decode is skipped, replaced and counted by the one damaged-sample
policy of sparse_mae.data.dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
from bisect import bisect_right
from pathlib import Path

import numpy as np

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
        """Every shard's files there and as long as its index says: a missing or cut-short file
        is a copy that did not finish, refused at start-up rather than met at the first
        evaluation. (Damaged bytes inside a file are found when read: skipped and counted.)"""
        root, problems = self.reader.root, []
        for shard, (name, rows) in enumerate(zip(self.reader.shards, self.reader.indexes)):
            count = int(self.reader.starts[shard + 1] - self.reader.starts[shard])
            if rows is None:
                problems.append(f"{name}.index.npy is missing or damaged")
                continue
            needed = int((rows["offset"] + rows["length"]).max()) if count else 0
            try:
                size = (root / f"{name}.data").stat().st_size
            except OSError:
                problems.append(f"{name}.data is missing")
                continue
            if size < needed:
                problems.append(f"{name}.data is cut short ({size} of {needed} bytes)")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
            raise ValueError(f"the shard folder {root} is incomplete: {shown}. {self.REPAIR[0].upper()}"
                             f"{self.REPAIR[1:]}")
        if len(self) == 0:
            raise ValueError(f"the shard folder {root} holds no samples; prepare it from a folder with images")
