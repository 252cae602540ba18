"""Image folder -> indexed shards (the format: sparse_mae/data/shards.py). `sparse-mae prepare`
is the command (sparse_mae/apps/prepare.py).

Each image is decoded (any format the folders hold, EXIF orientation applied), shrunk so its
shorter side is at most `short_side` and re-encoded as an RGB JPEG of `quality`. Labels come
from ImageNet-style class folders (src/<class>/**/*.jpg) when src holds only folders.

The work is cut into shards of `shard_size` source files in a fixed order (the plan), built in
parallel processes. A shard is committed by renaming its files into place and writing its
`.done.json` last; a run that is interrupted and started again with the same command keeps
every committed shard whose files verify against its record and builds the rest. Files that
cannot be read are listed (manifest.json, unreadable.txt) and skipped.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from sparse_mae.data.imagefolder import IMAGE_EXTENSIONS, find_images, upright_rgb
from sparse_mae.data.shards import FORMAT, INDEX_DTYPE, MANIFEST, VERSION, sample_checksum, shard_name
from sparse_mae.train.checkpoint import TEMP_PREFIX, atomic_write_bytes, sha256_of

PLAN = "prepare.json"


@dataclass(frozen=True)
class PrepareOptions:
    short_side: int | None = 256  # None: keep each image's size
    quality: int = 90
    shard_size: int = 1000


def scan_source(src: Path) -> tuple[list[tuple[Path, int]], list[str] | None, list[Path]]:
    """-> ([(file, label)], class names or None, zero-byte files). Labelled when src holds
    class folders and no image files of its own."""
    src = Path(src).expanduser()
    if not src.is_dir():
        find_images(src)  # its clear error for a missing path or a file
    top = sorted(p for p in src.iterdir() if p.is_dir())
    own = [p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not top or own:
        files, empty = find_images(src)
        return [(f, -1) for f in files], None, empty
    classes, samples, empty = [], [], []
    for folder in top:
        try:
            found, zero = find_images(folder)
        except ValueError:  # a class folder without images
            continue
        classes.append(folder.name)
        samples += [(f, len(classes) - 1) for f in found]
        empty += zero
    if not samples:
        raise ValueError(f"src={src} holds no readable images in its class folders")
    return samples, classes, empty


def encode(path: Path, options: PrepareOptions) -> bytes:
    """One source file -> JPEG bytes at the bounded size (raises on an unreadable file)."""
    with Image.open(path) as img:
        if img.format == "JPEG" and options.short_side:  # DCT-scaled decode: most photos shrink anyway
            k = options.short_side / min(img.size)
            img.draft("RGB", (math.ceil(img.width * k), math.ceil(img.height * k)))
        img.load()
        img = upright_rgb(img)
    if options.short_side and min(img.size) > options.short_side:
        k = options.short_side / min(img.size)
        img = img.resize((max(1, round(img.width * k)), max(1, round(img.height * k))), Image.BICUBIC,
                         reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=options.quality)
    return out.getvalue()


def build_shard(out: Path, index: int, samples: list[tuple[str, int]], options: PrepareOptions) -> dict:
    """Write one shard (data, index, names; then its .done.json) -> its record."""
    name = shard_name(index)
    rows, names, unreadable = [], [], []
    tmp_data = out / f"{TEMP_PREFIX}{name}.data.{os.getpid()}"
    with open(tmp_data, "wb") as f:
        for path, label in samples:
            try:
                data = encode(Path(path), options)
            except Exception as e:  # noqa: BLE001 - any failure to read a file lists it; the run goes on
                unreadable.append(f"{path}\t{type(e).__name__}: {e}")
                continue
            rows.append((f.tell(), len(data), label, sample_checksum(label, data)))
            names.append(path)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_data, out / f"{name}.data")
    index_rows = np.array(rows, dtype=INDEX_DTYPE)
    atomic_write_bytes(out / f"{name}.index.npy", lambda f: np.save(f, index_rows, allow_pickle=False))
    atomic_write_bytes(out / f"{name}.names.txt", lambda f: f.write("".join(n + "\n" for n in names).encode()))
    record = {"name": name, "count": len(rows), "data_bytes": (out / f"{name}.data").stat().st_size,
              "index_sha256": sha256_of(out / f"{name}.index.npy"), "unreadable": unreadable}
    atomic_write_bytes(out / f"{name}.done.json", lambda f: f.write(json.dumps(record).encode()))
    return record


def committed_shard(out: Path, index: int) -> dict | None:
    """The record of a shard built earlier whose files still verify (sizes, index digest and
    every sample's checksum), else None (it is built again)."""
    name = shard_name(index)
    try:
        record = json.loads((out / f"{name}.done.json").read_text())
        if (out / f"{name}.data").stat().st_size != record["data_bytes"]:
            return None
        if sha256_of(out / f"{name}.index.npy") != record["index_sha256"]:
            return None
        rows = np.load(out / f"{name}.index.npy", allow_pickle=False)
        with open(out / f"{name}.data", "rb") as f:
            for row in rows:
                f.seek(int(row["offset"]))
                if sample_checksum(int(row["label"]), f.read(int(row["length"]))) != int(row["checksum"]):
                    return None
        return record
    except (OSError, ValueError, KeyError):
        return None


def _build(job):
    return build_shard(*job)


def prepare(src: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions = PrepareOptions(),
            workers: int = 1, progress: Callable[[int], Callable[[int], None]] | None = None, log=print) -> dict:
    """Build (or continue building) the shard folder `out` from the image folder `src`;
    -> the manifest. `progress(total images)` returns the function told of each shard's images."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    if options.short_side is not None and options.short_side <= 0:
        raise ValueError(f"short_side must be > 0 or null (keep sizes), got {options.short_side}")
    if not 1 <= options.quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {options.quality}")
    if options.shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {options.shard_size}")
    if workers <= 0:
        raise ValueError(f"workers must be > 0, got {workers}")
    samples, classes, empty = scan_source(src)
    rel = [(str(p), label) for p, label in samples]
    fingerprint = hashlib.sha256(json.dumps([vars(options), rel]).encode()).hexdigest()
    plan = {"source": str(src), "options": vars(options), "files": len(rel), "fingerprint": fingerprint}
    out.mkdir(parents=True, exist_ok=True)
    if (out / PLAN).exists():
        earlier = json.loads((out / PLAN).read_text())
        if earlier.get("fingerprint") != fingerprint:
            raise ValueError(f"out={out} holds shards prepared from another source, file list or options "
                             f"({earlier.get('source')}, {earlier.get('options')}); choose a new out= or delete "
                             f"that folder")
    elif any(out.iterdir()):
        raise ValueError(f"out={out} is not empty and holds no `sparse-mae prepare` work; choose an empty or new "
                         f"folder")
    for p in out.iterdir():  # a killed writer's temp files
        if p.name.startswith(TEMP_PREFIX):
            p.unlink(missing_ok=True)
    atomic_write_bytes(out / PLAN, lambda f: f.write(json.dumps(plan, indent=1).encode()))

    chunks = [rel[i:i + options.shard_size] for i in range(0, len(rel), options.shard_size)]
    progress = progress(len(rel)) if progress else None
    records: dict[int, dict] = {}
    for i in range(len(chunks)):
        record = committed_shard(out, i)
        if record is not None:
            records[i] = record
            if progress:
                progress(len(chunks[i]))
    todo = [i for i in range(len(chunks)) if i not in records]
    if records:
        log(f"continuing: {len(records)} of {len(chunks)} shards already built and verified, {len(todo)} to build")
    jobs = [(out, i, chunks[i], options) for i in todo]
    if workers == 1 or len(jobs) <= 1:
        for i, job in zip(todo, jobs):
            records[i] = _build(job)
            if progress:
                progress(len(chunks[i]))
    else:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            for i, record in zip(todo, pool.map(_build, jobs)):
                records[i] = record
                if progress:
                    progress(len(chunks[i]))
    shards = [records[i] for i in range(len(chunks))]
    unreadable = [f"{p}\tzero-byte file" for p in map(str, empty)] + [u for s in shards for u in s["unreadable"]]
    if not any(s["count"] for s in shards):
        raise ValueError(f"no image under {src} could be read ({len(unreadable)} unreadable files)")
    manifest = {"format": FORMAT, "version": VERSION, "complete": True, "source": str(src),
                "options": vars(options), "classes": classes, "samples": sum(s["count"] for s in shards),
                "shards": [{k: s[k] for k in ("name", "count", "data_bytes", "index_sha256")} for s in shards],
                "unreadable": unreadable}
    atomic_write_bytes(out / "unreadable.txt", lambda f: f.write("".join(u + "\n" for u in unreadable).encode()))
    atomic_write_bytes(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest

