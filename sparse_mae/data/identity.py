"""A data set's identity: what it holds, not the path it was read from. A checkpoint records
the identity of the data its run read; resume compares identities, so the same data under
another spelling of its path, or moved (node-local staging, a copy), continues, and other
data under the same path is refused.

- shard folders (`data=shards`): the manifests' records, class names and per shard its
  sample count, data size and the SHA-256 of its index. The index holds every sample's
  checksum over its label and bytes, so the records stand for the content. A root holding
  the fine-tuning layout (train/ and val/ shard folders) is both of them.
- image folders and the Fashion-MNIST idx files: every file's path under the root and its
  size (reading every image's bytes would cost a pass over the data set at every start).
- the built-in images have none: the config draws them (data.num_images, draw_size, seed).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.data.shards import MANIFEST, read_manifest

SHARD_SPLITS = ("train", "val")  # the fine-tuning layout under one root


def data_identity(data_cfg: DictConfig) -> dict | None:
    """-> {"kind", "digest", "root"} of the data under data.root, or None (built-in images,
    or a root that does not exist: the dataset's own error names that)."""
    if data_cfg.get("root") is None:
        return None
    root = Path(str(data_cfg.root)).expanduser()
    if not root.is_dir():
        return None
    if data_cfg.name == "shards":
        folders = [root] if (root / MANIFEST).is_file() else [root / s for s in SHARD_SPLITS
                                                              if (root / s / MANIFEST).is_file()]
        if not folders:
            return None
        return {"kind": "shard manifests", "digest": shard_manifests_digest(root, folders), "root": str(root.resolve())}
    return {"kind": "file list and sizes", "digest": listing_digest(root), "root": str(root.resolve())}


def shard_manifests_digest(root: Path, folders: list[Path]) -> str:
    records = []
    for folder in folders:
        manifest = read_manifest(folder)
        shards = [[s.get("count"), s.get("data_bytes"), s.get("index_sha256")] for s in manifest.get("shards") or []]
        records.append([folder.relative_to(root).as_posix(), manifest.get("classes"), shards])
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()


def listing_digest(root: Path) -> str:
    """SHA-256 over every regular file's path (relative, as bytes: any file name) and size.
    Links to folders are not walked, so a link back into the tree is not counted twice."""
    entries = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        for name in names:
            path = os.path.join(folder, name)
            try:
                size = os.stat(path).st_size
            except OSError:  # a dangling link: not a file the data set can read
                continue
            entries.append((os.fsencode(os.path.relpath(path, root)), size))
    digest = hashlib.sha256()
    for rel, size in sorted(entries):
        digest.update(len(rel).to_bytes(4, "little") + rel + size.to_bytes(8, "little"))
    return digest.hexdigest()


def describe(identity: dict) -> str:
    return f"{identity['root']} ({identity['kind']} {identity['digest'][:12]})"
