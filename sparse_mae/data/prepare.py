"""A source of images -> indexed shards (the format: sparse_mae/data/shards.py). `sparse-mae
prepare` is the command (sparse_mae/apps/prepare.py). Two sources, one shard builder:

- an image folder (`FolderSource`): each image is decoded (any format the folders hold, EXIF
  orientation applied), shrunk so its shorter side is at most `short_side` and re-encoded as an
  RGB JPEG of `quality`. Labels come from ImageNet-style class folders (src/<class>/**/*.jpg)
  when src holds only folders. One shard folder.
- the four Fashion-MNIST idx files (`FashionMnistSource`, `prepare_fashion_mnist`): each image
  padded with background to 32x32 (FashionMnist.padded, what the apps upsample) and stored as
  a lossless grey PNG, so shard pixels equal the idx pixels; the fine-tuning layout out/train
  (the 60,000 training images) and out/val (the 10,000 test images), labelled.

A source gives its items in a fixed order with their labels (`scan`, in the main process),
reads one item's bytes (`read`) and turns them into image bytes (`encode`, in a worker; a
source object is small, so jobs carry it, not the images). The work is cut into shards of
`shard_size` items (the plan, whose fingerprint covers the options and the item list: names
and labels), built in parallel processes. Each item's bytes are hashed as they are read for
encoding (no second pass), and each shard's record holds the SHA-256 over its items' labels
and digests (`sources_sha256`) and over the options and its items' names and labels
(`items_sha256`). A shard is committed by renaming its files into place and writing its
`.done.json` last. A run started again with the same command (after an interruption, or
later) keeps a committed shard only when its files verify against its record, the record is
of the same items and options and its sources still hash to `sources_sha256`; it builds the rest,
so a source file rewritten under its name has its shard built again, and a shard of another
preparation is never kept. Items that cannot be read are listed (manifest.json,
unreadable.txt) and skipped. File names are stored escaped (sparse_mae/data/filenames.py).

Stopping: whatever exception leaves the build (a stop signal turned into one by the app, a
full disk, a failed shard), the pool's workers are killed at once instead of finishing
shards no one will use, and no temp file is left behind. A worker ignores stop signals (a
Ctrl-C reaches the whole process group; the main process decides) and never outlives the
main process, whatever kills it (`start_worker`). One writer per out: the app's lock
(sparse_mae/apps/prepare.py), whose files in out are not another work's.
"""
from __future__ import annotations

import ctypes
import hashlib
import io
import json
import math
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.connection import wait as wait_for_processes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError

from sparse_mae.data import fashion_mnist
from sparse_mae.data.filenames import printable_name
from sparse_mae.data.imagefolder import IMAGE_EXTENSIONS, find_images, leads_back, upright_rgb
from sparse_mae.data.manifest import (FORMAT, INDEX_DTYPE, MANIFEST, PLAN, VERSION, ShardMismatch, check_shard,
                                      data_set_fingerprint, read_commit_record, read_plan, shard_name)
from sparse_mae.data.shards import sample_checksum
from sparse_mae.io import FALLBACK_LOCK_NAME, LOCK_NAME, TEMP_PREFIX, atomic_write_bytes, sha256_of

LOCK_FILES = {LOCK_NAME, FALLBACK_LOCK_NAME}  # the app's lock on out: not another work's files
FASHION_MNIST_SPLITS = {"train": "train", "val": "test"}  # shard folder -> idx split (the test split is val)


@dataclass(frozen=True)
class PrepareOptions:
    short_side: int | None = 256  # None: keep each image's size (image folders)
    quality: int = 90  # JPEG quality (image folders)
    shard_size: int = 1000


@dataclass
class Scan:
    """What a source holds, listed in the main process."""

    items: list  # (item, label) in shard order; `item` is what read(), encode() and name() take (small, picklable)
    classes: list[str] | None  # class names (labelled), or None
    options: dict  # how the images are stored: the manifest's "options"
    fingerprint: str  # the plan's: changes when the item list (names, labels) or the options change
    skipped: list[str] = field(default_factory=list)  # "name\twhy" of items left out before encoding


def scan_source(src: Path) -> tuple[list[tuple[Path, int]], list[str] | None, list[Path]]:
    """-> ([(file, label)], class names or None, zero-byte files). Labelled when src holds
    class folders and no image files of its own."""
    src = Path(src).expanduser()
    if not src.is_dir():
        find_images(src)  # its clear error for a missing path or a file
    real_src = os.path.realpath(src)  # a symlink back into the source or above it is not a class
    top = sorted(p for p in src.iterdir() if p.is_dir() and not leads_back(str(p), real_src))
    own = [p for p in src.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)]
    if not top or own:
        files, empty = find_images(src)
        return [(f, -1) for f in files], None, empty
    classes, samples, empty = [], [], []
    for folder in top:
        try:
            found, zero = find_images(folder, tree=src)
        except ValueError:  # a class folder without images
            continue
        classes.append(folder.name)
        samples += [(f, len(classes) - 1) for f in found]
        empty += zero
    if not samples:
        raise ValueError(f"src={src} holds no readable images in its class folders")
    return samples, classes, empty


def encode(raw: bytes, options: PrepareOptions) -> bytes:
    """One source file's bytes -> JPEG bytes at the bounded size (raises on an unreadable image)."""
    try:
        img = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:  # (its own message names the memory buffer, another each run)
        raise UnidentifiedImageError("cannot identify the image format") from None
    with img:
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


@dataclass(frozen=True)
class FolderSource:
    """An image folder: items are file paths, stored as JPEGs of a bounded size."""

    root: Path
    options: PrepareOptions

    def stored_as(self) -> dict:
        """How the images are stored: the manifest's options."""
        return vars(self.options)

    def scan(self) -> Scan:
        samples, classes, empty = scan_source(self.root)
        items = [(str(p), label) for p, label in samples]
        fingerprint = hashlib.sha256(json.dumps([self.stored_as(), items]).encode()).hexdigest()
        return Scan(items, classes, self.stored_as(), fingerprint,
                    [f"{printable_name(p)}\tzero-byte file" for p in empty])

    def read(self, item: str) -> bytes:
        with open(item, "rb") as f:
            return f.read()

    def encode(self, item: str, raw: bytes) -> bytes:
        return encode(raw, self.options)

    def name(self, item: str) -> str:
        return printable_name(item)


_LOADED: dict[tuple[str, str], fashion_mnist.FashionMnist] = {}


def loaded_split(root: str | os.PathLike, split: str) -> fashion_mnist.FashionMnist:
    """One Fashion-MNIST split, read once per process (each worker reads the idx file itself
    instead of receiving 47 MB with every job); one split held at a time."""
    key = (str(root), split)
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = fashion_mnist.FashionMnist(root, split)
    return _LOADED[key]


@dataclass(frozen=True)
class FashionMnistSource:
    """One split of the Fashion-MNIST idx files: items are image indices, stored as lossless
    grey PNGs of the image padded to 32x32 (FashionMnist.padded)."""

    root: Path
    split: str  # "train" or "test"
    shard_size: int
    images_file: str  # the idx file's name, for each sample's name

    def stored_as(self) -> dict:
        """How the images are stored: the manifest's options."""
        return {"encoding": "png", "pixels": f"grey {fashion_mnist.SIDE}x{fashion_mnist.SIDE} padded with "
                f"background to {fashion_mnist.PADDED}x{fashion_mnist.PADDED}, lossless",
                "split": self.split, "shard_size": self.shard_size}

    def scan(self) -> Scan:
        data = loaded_split(self.root, self.split)
        options = self.stored_as()
        content = hashlib.sha256(data.images.tobytes())
        content.update(data.labels.tobytes())  # the pixels and labels, not where the files lie
        fingerprint = hashlib.sha256(json.dumps([options, content.hexdigest()]).encode()).hexdigest()
        return Scan([(i, int(label)) for i, label in enumerate(data.labels)], list(fashion_mnist.CLASSES), options,
                    fingerprint)

    def read(self, item: int) -> bytes:
        return loaded_split(self.root, self.split).images[item].tobytes()  # the pixels encode() pads

    def encode(self, item: int, raw: bytes) -> bytes:
        out = io.BytesIO()
        Image.fromarray(loaded_split(self.root, self.split).padded(item), mode="L").save(out, "PNG")
        return out.getvalue()

    def name(self, item: int) -> str:
        return f"{self.images_file}[{item}]"


class SourceDigest:
    """SHA-256 over a shard's sources in order: each item's label and the SHA-256 of its
    bytes, or a mark for an item whose file could not be read. One definition for the
    build (fed as it reads) and for the check of a committed shard (which reads again)."""

    UNREADABLE = bytes(32)

    def __init__(self):
        self._sha = hashlib.sha256()

    def add(self, label: int, raw: bytes | None) -> None:
        self._sha.update(int(label).to_bytes(4, "little", signed=True))
        self._sha.update(self.UNREADABLE if raw is None else hashlib.sha256(raw).digest())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def items_sha256(samples: list[tuple[object, int]], source) -> str:
    """What a shard is built from, by name: SHA-256 over the source's options and the shard's
    items' names and labels (its part of the plan)."""
    return hashlib.sha256(json.dumps([source.stored_as(), [[source.name(item), label] for item, label in samples]])
                          .encode()).hexdigest()


def build_shard(out: Path, index: int, samples: list[tuple[object, int]], source) -> dict:
    """Write one shard (data, index, names; then its .done.json) -> its record."""
    name = shard_name(index)
    rows, names, unreadable = [], [], []
    sources = SourceDigest()

    def write_samples(f) -> None:
        for item, label in samples:
            try:
                raw = source.read(item)
            except OSError as e:
                sources.add(label, None)
                unreadable.append(f"{source.name(item)}\t{type(e).__name__}: {e.strerror or e}")
                continue
            sources.add(label, raw)  # hashed here, while its bytes are in memory for the encode
            try:
                data = source.encode(item, raw)
            except Exception as e:  # noqa: BLE001 - any failure to read a file lists it; the run goes on
                unreadable.append(f"{source.name(item)}\t{type(e).__name__}: {one_line(str(e))}")
                continue
            rows.append((f.tell(), len(data), label, sample_checksum(label, data)))
            names.append(source.name(item))
            f.write(data)

    # the one atomic write: a full disk or a stop leaves no half shard filling it
    atomic_write_bytes(out / f"{name}.data", write_samples)
    index_rows = np.array(rows, dtype=INDEX_DTYPE)
    atomic_write_bytes(out / f"{name}.index.npy", lambda f: np.save(f, index_rows, allow_pickle=False))
    atomic_write_bytes(out / f"{name}.names.txt", lambda f: f.write("".join(n + "\n" for n in names).encode()))
    record = {"name": name, "count": len(rows), "data_bytes": (out / f"{name}.data").stat().st_size,
              "index_sha256": sha256_of(out / f"{name}.index.npy"), "sources_sha256": sources.hexdigest(),
              "items_sha256": items_sha256(samples, source), "unreadable": unreadable}
    atomic_write_bytes(out / f"{name}.done.json", lambda f: f.write(json.dumps(record).encode()))
    return record


def one_line(text: str) -> str:
    return " ".join(text.split())


SOURCES_CHANGED = "its source files changed since it was built"
OTHER_ITEMS = "it was built from other files or options (another preparation's shard)"


def committed_shard(out: Path, index: int, samples: list[tuple[object, int]], source,
                    classes: list[str] | None) -> tuple[dict | None, str | None]:
    """(the record of shard `index`, built earlier, None) when it can be kept: its record is of
    these items and options, its files verify (index digest and rows, every sample's checksum)
    and its sources hash as they did. Else (None, why it is built again; None where it was
    never committed or is damaged, which the summary line covers)."""
    if not (out / f"{shard_name(index)}.done.json").exists():
        return None, None
    try:
        record = read_commit_record(out, index)
        if record["items_sha256"] != items_sha256(samples, source):
            return None, OTHER_ITEMS
        rows, data_size = check_shard(out, record, classes)
        if data_size != record["data_bytes"]:
            return None, None
        with open(out / f"{record['name']}.data", "rb") as f:
            for row in rows:
                f.seek(int(row["offset"]))
                if sample_checksum(int(row["label"]), f.read(int(row["length"]))) != int(row["checksum"]):
                    return None, None
    except (ShardMismatch, OSError):
        return None, None
    sources = SourceDigest()
    for item, label in samples:  # the sources again: a file rewritten under its name shows here
        try:
            sources.add(label, source.read(item))
        except OSError:
            sources.add(label, None)
    if sources.hexdigest() != record["sources_sha256"]:
        return None, SOURCES_CHANGED
    return record, None


def _build(job):
    return build_shard(*job)


WORKER_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def start_worker(parent: int) -> None:
    """A pool worker's set-up: stop signals are the main process's to act on (a terminal's
    Ctrl-C and a scheduler's signal reach every process of the job), and the worker ends
    when its parent does, whatever kills the parent (kill -9 included): on Linux the kernel
    kills it (PR_SET_PDEATHSIG); everywhere a thread checks once a second that its parent
    is still the one that started it."""
    for sig in WORKER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORES)  # blocked by `submitted` until now
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    if os.getppid() != parent:  # it died before the kernel was asked to tell us
        os._exit(1)
    threading.Thread(target=watch_parent, name="end-with-parent", daemon=True).start()


def submitted(pool: ProcessPoolExecutor, jobs: list) -> list:
    """pool.submit each job -> the futures. The first submit starts the workers: stop signals
    are blocked meanwhile, so a worker never runs the main process's handler between its fork
    and `start_worker` (a signal that comes then reaches the main process after)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)
    try:
        return [pool.submit(_build, job) for job in jobs]
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def kill_pool(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now and wait only for them to be gone (their half-written shards are
    temp files, removed next), not for the shards they were building."""
    workers = list((pool._processes or {}).values())  # (private, as is the manager thread: the only handles)
    manager = pool._executor_manager_thread
    for worker in workers:
        worker.kill()
    wait_for_processes([w.sentinel for w in workers], timeout=10)
    # (no cancel_futures, nor pool.map, which cancels when left: the pool, broken by the kill, fails
    # the pending futures itself, and one already cancelled it cannot fail: a thread's traceback)
    pool.shutdown(wait=False)
    if manager is not None:  # its clean-up done before the interpreter's exit wakes it (a race in
        manager.join(timeout=10)  # Python 3.11: the wake-up wrote to a pipe it had closed, a traceback)


def remove_temp_files(out: Path) -> None:
    """Temp files of a killed or failed writer (only ours: the app holds out's lock)."""
    for p in out.iterdir():
        if p.name.startswith(TEMP_PREFIX):
            p.unlink(missing_ok=True)


def check_options(options: PrepareOptions, workers: int) -> None:
    if options.short_side is not None and options.short_side <= 0:
        raise ValueError(f"short_side must be > 0 or null (keep sizes), got {options.short_side}")
    if not 1 <= options.quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {options.quality}")
    if options.shard_size <= 0:
        raise ValueError(f"shard_size must be > 0, got {options.shard_size}")
    if workers <= 0:
        raise ValueError(f"workers must be > 0, got {workers}")


def build_shards(source, scan: Scan, described: str, out: Path, shard_size: int, workers: int,
                 update: Callable[[int], None] | None, log) -> dict:
    """Build (or continue building) the shard folder `out` from a scanned source -> its manifest.
    `described` names the source in the plan and the manifest; `update(n)` is told of each shard's items."""
    plan = {"source": described, "options": scan.options, "files": len(scan.items), "fingerprint": scan.fingerprint}
    out.mkdir(parents=True, exist_ok=True)
    if (out / PLAN).exists():
        earlier = read_plan(out)
        if earlier["fingerprint"] != scan.fingerprint:
            raise ValueError(f"out={out} holds shards prepared from another source, file list or options "
                             f"({earlier.get('source')}, {earlier.get('options')}); choose a new out= or delete "
                             f"that folder")
    elif any(p.name not in LOCK_FILES for p in out.iterdir()):
        raise ValueError(f"out={out} is not empty and holds no `sparse-mae prepare` work; choose an empty or new "
                         f"folder")
    remove_temp_files(out)
    atomic_write_bytes(out / PLAN, lambda f: f.write(json.dumps(plan, indent=1).encode()))

    chunks = [scan.items[i:i + shard_size] for i in range(0, len(scan.items), shard_size)]
    records: dict[int, dict] = {}
    rebuilt = False
    for i in range(len(chunks)):
        record, why = committed_shard(out, i, chunks[i], source, scan.classes)
        if record is not None:
            records[i] = record
            if update:
                update(len(chunks[i]))
        elif why:
            rebuilt = True
            log(f"{shard_name(i)} is built again: {why}")
    todo = [i for i in range(len(chunks)) if i not in records]
    if records or rebuilt:
        log(f"continuing: {len(records)} of {len(chunks)} shards already built and verified, {len(todo)} to build")
    jobs = [(out, i, chunks[i], source) for i in todo]

    def built(i: int, record: dict) -> None:
        records[i] = record
        if update:
            update(len(chunks[i]))

    try:
        if workers == 1 or len(jobs) <= 1:
            for i, job in zip(todo, jobs):
                built(i, _build(job))
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)), initializer=start_worker,
                                       initargs=(os.getpid(),))
            try:
                for i, future in zip(todo, submitted(pool, jobs)):
                    built(i, future.result())
                pool.shutdown()
            except BaseException:
                kill_pool(pool)
                raise
    except BaseException:
        remove_temp_files(out)
        raise
    shards = [records[i] for i in range(len(chunks))]
    unreadable = scan.skipped + [u for s in shards for u in s["unreadable"]]
    if not any(s["count"] for s in shards):
        raise ValueError(f"no image of {described} could be read ({len(unreadable)} unreadable files)")
    manifest = {"format": FORMAT, "version": VERSION, "complete": True, "source": described,
                "options": scan.options, "classes": scan.classes, "samples": sum(s["count"] for s in shards),
                "shards": [{k: s[k] for k in ("name", "count", "data_bytes", "index_sha256", "sources_sha256")}
                           for s in shards],
                "unreadable": unreadable}
    manifest["fingerprint"] = data_set_fingerprint(manifest)
    atomic_write_bytes(out / "unreadable.txt", lambda f: f.write("".join(u + "\n" for u in unreadable).encode()))
    atomic_write_bytes(out / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


def prepare(src: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions = PrepareOptions(),
            workers: int = 1, progress: Callable[[int], Callable[[int], None]] | None = None, log=print) -> dict:
    """Build (or continue building) the shard folder `out` from the image folder `src`;
    -> the manifest. `progress(total images)` returns the function told of each shard's images."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    check_options(options, workers)
    source = FolderSource(src, options)
    scan = source.scan()
    update = progress(len(scan.items)) if progress else None
    return build_shards(source, scan, printable_name(src), out, options.shard_size, workers, update, log)


IDX_NAMES = {fashion_mnist.idx_name(split, what) for split in fashion_mnist.SPLITS for what in ("images", "labels")}


def holds_fashion_mnist(src: str | os.PathLike) -> bool:
    """Whether `src` is a folder holding Fashion-MNIST idx files (any of the four, .gz or not)."""
    src = Path(src).expanduser()
    return src.is_dir() and any(
        p.is_file() and p.name.removesuffix(".gz") in IDX_NAMES for p in src.iterdir())



def prepare_fashion_mnist(src: str | os.PathLike, out: str | os.PathLike, options: PrepareOptions = PrepareOptions(),
                          workers: int = 1, progress: Callable[[int], Callable[[int], None]] | None = None,
                          log=print) -> dict[str, dict]:
    """Build (or continue building) out/train and out/val from the four Fashion-MNIST idx files
    in `src` -> {"train": manifest, "val": manifest}. `options.short_side` and `quality` do not
    apply (the images are stored losslessly)."""
    src, out = Path(src).expanduser().resolve(), Path(out).expanduser()
    check_options(options, workers)
    for split in FASHION_MNIST_SPLITS.values():  # all four files, else the error that names the fix
        for what in ("images", "labels"):
            fashion_mnist.idx_path(src, split, what)
    besides = sorted(printable_name(p.name) for p in src.iterdir()
                     if p.is_dir() or (p.is_file() and p.name.lower().endswith(IMAGE_EXTENSIONS)))
    if besides:
        raise ValueError(f"src={src} holds the Fashion-MNIST idx files and also images or folders "
                         f"({', '.join(besides[:5])}): ambiguous; prepare the idx files from a folder of their own")
    if out.is_dir() and any(p.name not in FASHION_MNIST_SPLITS and p.name not in LOCK_FILES for p in out.iterdir()):
        raise ValueError(f"out={out} holds more than the train/ and val/ of a Fashion-MNIST prepare; choose an "
                         f"empty or new folder")
    sources = {folder: FashionMnistSource(src, split, options.shard_size,
                                          fashion_mnist.idx_path(src, split, "images").name)
               for folder, split in FASHION_MNIST_SPLITS.items()}
    counts = {folder: len(fashion_mnist.read_idx(fashion_mnist.idx_path(src, s.split, "labels")))
              for folder, s in sources.items()}
    update = progress(sum(counts.values())) if progress else None
    manifests = {}
    try:
        for folder, source in sources.items():
            scan = source.scan()
            described = f"{printable_name(src)} (Fashion-MNIST {source.split} split)"
            manifests[folder] = build_shards(source, scan, described, out / folder, options.shard_size, workers, update,
                                             lambda message, folder=folder: log(f"{folder}: {message}"))
    finally:
        _LOADED.clear()  # 47 MB no longer needed in this process
    return manifests
