"""A data set's identity: what it holds, not the path it was read from. A checkpoint records
the identity of the data its run read; resume compares identities, so the same data under
another spelling of its path, or moved (node-local staging, a copy), continues, and other
data under the same path is refused.

- shard folders (`data=shards`): the manifest's fingerprint (data/manifest.py: the class
  names, each shard's count and index digest; the index holds every sample's checksum over
  its label and bytes), so no data is read for it (that the files agree with their records
  is the reader's check). A root in the fine-tuning layout (train/ and val/ shard folders)
  is both fingerprints.
- image folders: the images the data set reads (data/imagefolder.find_images: the same walk,
  the same symlink rule), each one's path under the root and its size. Reading every image
  would cost a pass over the data set at every start; the walk costs one stat per file.
- Fashion-MNIST: the SHA-256 of the idx files themselves (at most 60 MB, read in well
  under a second).
- the built-in images have none: the config draws them (data.num_images, draw_size, seed).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.data.fashion_mnist import SPLITS, idx_path
from sparse_mae.data.imagefolder import find_images
from sparse_mae.data.manifest import MANIFEST, read_manifest
from sparse_mae.io import sha256_of

SHARD_SPLITS = ("train", "val")  # the fine-tuning layout under one root


def data_identity(data_cfg: DictConfig) -> dict | None:
    """-> {"kind", "digest", "root" (resolved), "as_written" (data.root)} of the data under
    data.root, or None: the built-in images, or a root without the data (the data set's own
    error names what is wrong there)."""
    if data_cfg.name == "builtin" or data_cfg.get("root") is None:
        return None
    root = Path(str(data_cfg.root)).expanduser()
    if not root.is_dir():
        return None
    if data_cfg.name == "shards":
        kind, digest = "shard fingerprint", shard_fingerprint(root)
    elif data_cfg.name == "fashion_mnist":
        kind, digest = "idx files", idx_files_digest(root)
    else:
        kind, digest = "image files and sizes", image_listing_digest(root)
    if digest is None:
        return None
    return {"kind": kind, "digest": digest, "root": str(root.resolve()), "as_written": str(data_cfg.root)}


def shard_fingerprint(root: Path) -> str | None:
    folders = [root] if (root / MANIFEST).is_file() else [root / s for s in SHARD_SPLITS
                                                          if (root / s / MANIFEST).is_file()]
    if not folders:
        return None
    if folders == [root]:
        return read_manifest(root)["fingerprint"]  # the one prepare printed
    splits = [[folder.name, read_manifest(folder)["fingerprint"]] for folder in folders]
    return hashlib.sha256(json.dumps(splits).encode()).hexdigest()


def image_listing_digest(root: Path) -> str:
    """SHA-256 over each image's path under the root (its bytes: any file name) and size."""
    files, _ = find_images(root)  # zero-byte files are never read: not part of the data
    cut = len(os.fsencode(str(root))) + 1  # each path is root/...: the part under it (Path.relative_to is 2x slower)
    digest = hashlib.sha256()
    for path in files:  # sorted by path
        rel = os.fsencode(str(path))[cut:]
        digest.update(len(rel).to_bytes(4, "little") + rel + path.stat().st_size.to_bytes(8, "little"))
    return digest.hexdigest()


def idx_files_digest(root: Path) -> str | None:
    """SHA-256 over the idx files there are (pretraining needs only the train split's)."""
    lines = []
    for split in SPLITS:
        for what in ("images", "labels"):
            try:
                lines.append(f"{split} {what} {sha256_of(idx_path(root, split, what))}\n")
            except FileNotFoundError:
                continue
    return hashlib.sha256("".join(lines).encode()).hexdigest() if lines else None


def describe(identity: dict) -> str:
    return f"{identity['root']} ({identity['kind']} {identity['digest'][:12]})"
