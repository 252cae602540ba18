"""Files written whole or not at all, and their digests: the one atomic write every writer of
the project uses (checkpoints, manifests, exports, results).

A file is written to a hidden temp file beside its final name (TEMP_PREFIX), flushed and
fsync'ed, then renamed over the final name (atomic on POSIX) and the folder fsync'ed. An
exception leaves no temp file; a hard kill may leave one, which its folder's owner removes
(a run directory's clean-up, prepare's start).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

TEMP_PREFIX = ".tmp-"
# the files of a folder's one-writer lock (train/rundir.py: flock, or the fallback file
# where the filesystem has no flock), kept in the folder it guards: a run directory, or
# prepare's out, which must not count them as another work's files
LOCK_NAME = "run.lock"
FALLBACK_LOCK_NAME = "run.lock.held"


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not allow opening a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    return path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")


def write_temp(path: Path, write: Callable) -> Path:
    """`write(file)` into a temp file beside `path`, flushed and fsync'ed; -> the temp path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # an exception (not a hard kill) leaves no temp file
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, write: Callable) -> None:
    """Call `write(file_object)` on a temp file beside `path`, fsync, then rename onto `path`."""
    path = Path(path)
    tmp = write_temp(path, write)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
