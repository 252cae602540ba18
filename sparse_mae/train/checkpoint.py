"""Checkpoints: atomic writes, a checksum beside each, rotation, and resume that survives damage.

Layout inside a run directory's `checkpoints/` folder:

    step-00000100.pt      torch.save of a plain dict (tensors, numbers, strings only)
    step-00000100.yaml    the run's resolved config
    step-00000100.json    the record: sha256 and size of the .pt, the run id, and `seq`,
                          the order in which this directory's checkpoints were written

Each file is first written to a hidden temp file in the same folder, flushed and fsync'ed,
then renamed over its final name (atomic on POSIX). The record is renamed into place
before the checkpoint, so every checkpoint that exists has its checksum beside it; a kill
at any moment leaves the previous checkpoints intact and at worst a temp file or a
record without its checkpoint, both ignored here and removed by the next save.

"Newest" means last written (highest `seq`), not highest step: a run resumed from an
earlier checkpoint of its directory continues from what it wrote last. Rotation deletes
only the oldest checkpoints of the run that is writing; it never touches another run's
files, nor files written without a record (by older versions).
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from sparse_mae.errors import RunStopped
from sparse_mae.io import TEMP_PREFIX, atomic_write_bytes, fsync_dir, sha256_of, write_temp

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
NO_RECORD = -1  # seq of a checkpoint written without a record: older than any recorded one


class CheckpointWriteFailed(RunStopped):
    """The disk refused a checkpoint (full, quota, file-size limit): the run stops (exit 3)."""


def _os_error_in(error: BaseException) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class CorruptCheckpointError(ValueError):
    """A checkpoint file that does not match its checksum or cannot be read."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    path: Path
    seq: int = NO_RECORD
    run_id: str | None = None
    sha256: str | None = None
    size: int | None = None


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def record_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def _read_record(checkpoint: Path) -> dict | None:
    try:
        record = json.loads(record_path(checkpoint).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def list_checkpoints(folder: str | os.PathLike) -> list[CheckpointInfo]:
    """Checkpoints in `folder`, oldest written first (those without a record first, by step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if not m:
            continue
        record = _read_record(p) or {}
        seq = record.get("seq")
        found.append(CheckpointInfo(
            step=int(m.group(1)), path=p, seq=seq if isinstance(seq, int) else NO_RECORD,
            run_id=record.get("run_id"), sha256=record.get("sha256"), size=record.get("bytes")))
    return sorted(found, key=lambda c: (c.seq, c.step))


def find_latest(folder: str | os.PathLike) -> Path | None:
    """The checkpoint written last (not verified; see `newest_good_checkpoint`)."""
    found = list_checkpoints(folder)
    return found[-1].path if found else None


# -- writing -----------------------------------------------------------------------------

def remove_stale_files(folder: Path) -> None:
    """Temp files of a killed writer, and records / configs whose checkpoint never landed.
    Only safe while no other process writes here (the run directory's lock)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(TEMP_PREFIX) or (
                p.suffix in (".json", ".yaml") and p.name.startswith("step-") and not p.with_suffix(".pt").exists()):
            p.unlink(missing_ok=True)


def save_checkpoint(folder: str | os.PathLike, step: int, state: dict, config_yaml: str | None = None,
                    keep_last: int = 3, run_id: str | None = None) -> Path:
    """Write `state` as checkpoint `step` with its config and record, then delete this run's
    oldest checkpoints beyond the last `keep_last` (0 keeps all). Returns the checkpoint path."""
    folder = Path(folder)
    path = checkpoint_path(folder, step)
    remove_stale_files(folder)
    existing = list_checkpoints(folder)
    seq = max((c.seq for c in existing), default=NO_RECORD) + 1
    try:
        if config_yaml is not None:
            atomic_write_bytes(path.with_suffix(".yaml"), lambda f: f.write(config_yaml.encode()))
        tmp = write_temp(path, lambda f: torch.save(state, f))
        record = {"step": step, "seq": seq, "run_id": run_id, "sha256": sha256_of(tmp), "bytes": tmp.stat().st_size}
        atomic_write_bytes(record_path(path), lambda f: f.write(json.dumps(record, indent=1).encode()))
    except (OSError, RuntimeError) as e:
        os_error = _os_error_in(e)  # torch.save says "[enforce fail at inline_container.cc]", the cause below
        if os_error is None:
            raise
        for sidecar in (path.with_suffix(".yaml"), record_path(path)):
            sidecar.unlink(missing_ok=True)
        reason = os.strerror(os_error.errno) if os_error.errno else str(os_error)
        raise CheckpointWriteFailed(
            f"cannot write checkpoint {path}: {reason} ({errno.errorcode.get(os_error.errno, 'error')}); the run "
            f"stopped, and the checkpoints written before are intact. Free space (or raise the file-size limit), "
            f"then continue with resume=auto") from e
    os.replace(tmp, path)
    fsync_dir(folder)
    if keep_last > 0 and run_id is not None:
        ours = [c for c in list_checkpoints(folder) if c.run_id == run_id and c.seq != NO_RECORD]
        for old in ours[:-keep_last]:
            old.path.unlink(missing_ok=True)
            for sidecar in (record_path(old.path), old.path.with_suffix(".yaml")):
                sidecar.unlink(missing_ok=True)
    return path


# -- reading -----------------------------------------------------------------------------

def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CorruptCheckpointError when the file differs from its record (size or sha256).
    A checkpoint without a record (older versions, hand-made files) passes unverified."""
    path = Path(path)
    record = _read_record(path)
    if record is None:
        return
    size = path.stat().st_size
    if record.get("bytes") is not None and size != record["bytes"]:
        raise CorruptCheckpointError(f"{path} has {size} bytes, its record says {record['bytes']} (truncated?)")
    if record.get("sha256") and sha256_of(path) != record["sha256"]:
        raise CorruptCheckpointError(f"{path} does not match the sha256 in {record_path(path).name}")


# torch.save stores its records uncompressed, so their declared sizes add up to about the
# file's; a zip whose records inflate far beyond it is refused before anything is inflated.
MAX_DECLARED_PER_FILE_BYTE = 2
DECLARED_SLACK_BYTES = 1 << 20
_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def guard_checkpoint_file(path: str | os.PathLike, what: str = "checkpoint") -> Path:
    """The one check before any checkpoint file is read (resume, init=, pretrained=, eval,
    import, export): a regular, non-empty file whose zip records (torch's format) do not
    declare more bytes than the file could hold uncompressed. Names what the path is instead
    (a directory, a FIFO, a device...), so nothing hangs reading a pipe or fills memory."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CorruptCheckpointError(f"{what} {path} cannot be examined: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CorruptCheckpointError(f"{what} {path} is a directory, not a checkpoint file; name a file in it "
                                     f"(e.g. {path}/checkpoints/step-*.pt)")
    for is_kind, kind in _KINDS:
        if is_kind(st.st_mode):
            raise CorruptCheckpointError(f"{what} {path} is {kind}, not a regular file; pass a checkpoint file")
    if st.st_size == 0:
        raise CorruptCheckpointError(f"{what} {path} is an empty file (0 bytes): a copy that did not finish? "
                                     f"Pass a complete checkpoint")
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError:
        is_zip = False
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                declared = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise CorruptCheckpointError(f"{what} {path} is a damaged zip archive: {e}") from None
        if declared > MAX_DECLARED_PER_FILE_BYTE * st.st_size + DECLARED_SLACK_BYTES:
            raise CorruptCheckpointError(
                f"{what} {path} declares {declared} bytes of records in a {st.st_size}-byte file (compressed "
                f"records; torch.save writes them uncompressed): refused before inflating it. Not a checkpoint "
                f"this program wrote; re-save it with torch.save")
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu", verify: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no code is unpickled),
    after checking it against its record. Damage raises CorruptCheckpointError."""
    path = guard_checkpoint_file(path)
    if verify:
        verify_checkpoint(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a torn or foreign file fails in many ways
        if "weights_only" in str(e) and "Unsupported global" in str(e):
            raise  # someone's pickled code: not damage, and never loaded
        raise CorruptCheckpointError(f"{path} cannot be read: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if not isinstance(state, dict):
        raise CorruptCheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    return state


TRAINING_KEYS = ("model", "optimizer", "step")


def newest_good_checkpoint(folder: str | os.PathLike, map_location="cpu",
                           warn: Callable[[str], None] = print) -> tuple[Path | None, dict | None]:
    """The newest checkpoint of `folder` that verifies and loads, as (path, state); every
    newer one that fails is named in a warning. (None, None) when the folder has none.
    Raises when checkpoints exist but none is usable: starting over would silently
    discard the run."""
    candidates = list_checkpoints(folder)
    failures = []
    for info in reversed(candidates):
        try:
            state = load_checkpoint(info.path, map_location=map_location)
            missing = [k for k in TRAINING_KEYS if k not in state]
            if missing:
                raise CorruptCheckpointError(f"{info.path} lacks {missing}: not a training checkpoint")
        except CorruptCheckpointError as e:
            failures.append(str(e))
            warn(f"warning: skipping checkpoint {info.path.name}: {e}")
            continue
        return info.path, state
    if candidates:
        raise CorruptCheckpointError(
            f"none of the {len(candidates)} checkpoints in {folder} is usable:\n  " + "\n  ".join(failures)
            + "\nMove them elsewhere to start this output_dir afresh, or pass resume=PATH to a good copy.")
    return None, None


def newest_verified_step(folder: str | os.PathLike) -> int:
    """The step of the newest checkpoint of `folder` whose file matches its record (size and
    sha256; see `verify_checkpoint`), 0 when there is none. Cheaper than
    `newest_good_checkpoint`: nothing is unpickled (for the SLURM script's requeue rule)."""
    for info in reversed(list_checkpoints(folder)):
        try:
            verify_checkpoint(info.path)
        except (CorruptCheckpointError, OSError):
            continue
        return info.step
    return 0


def explicit_resume_path(resume: str | None) -> Path | None:
    """`resume` other than null/auto -> the checkpoint file it names (a folder: its newest)."""
    if resume is None or str(resume).lower() in ("", "none", "null", "false", "auto"):
        return None
    path = Path(resume)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"resume={resume}: no step-*.pt checkpoint in that folder")
        return latest
    if not path.exists():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file; use resume=auto to continue "
                                f"from the newest checkpoint of this run's output_dir")
    return guard_checkpoint_file(path, "resume=")


def wants_auto_resume(resume: str | None) -> bool:
    return resume is not None and str(resume).lower() == "auto"
