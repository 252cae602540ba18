"""Checkpoints: atomic writes, keep the last K, find the latest for `resume=auto`.

Layout inside a run directory's `checkpoints/` folder:

    step-00000100.pt      torch.save of a plain dict (tensors, numbers, strings only)
    step-00000100.yaml    the run's resolved config, beside every checkpoint

A checkpoint is first written to a hidden temp file in the same folder, flushed and
fsync'ed, then renamed over its final name (rename is atomic on POSIX), so a crash at
any moment leaves either the old set of checkpoints or the new one, never a torn file.
Temp files left by a crash are ignored by `find_latest` and removed by the next save.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
TEMP_PREFIX = ".tmp-"


def checkpoint_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder`, oldest first, as (step, path)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def find_latest(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def _fsync_dir(folder: Path) -> None:
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


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file_object)` on a temp file beside `path`, fsync, then rename onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # An exception (not a hard kill) must not leave the temp file behind.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save_checkpoint(
    folder: str | os.PathLike, step: int, state: dict, config_yaml: str | None = None, keep_last: int = 3
) -> Path:
    """Write `state` as checkpoint `step` (and the config beside it), then prune to the last
    `keep_last` checkpoints (0 or less keeps all). Returns the checkpoint path."""
    folder = Path(folder)
    path = checkpoint_path(folder, step)
    for stale in folder.glob(f"{TEMP_PREFIX}*") if folder.is_dir() else []:
        stale.unlink(missing_ok=True)  # left by a killed run
    if config_yaml is not None:
        # config first: a checkpoint that exists always has its config beside it
        atomic_write_bytes(path.with_suffix(".yaml"), lambda f: f.write(config_yaml.encode()))
    atomic_write_bytes(path, lambda f: torch.save(state, f))
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            old.unlink(missing_ok=True)
            old.with_suffix(".yaml").unlink(missing_ok=True)
    for config in folder.glob("step-*.yaml"):  # a config whose checkpoint never landed (killed mid-save)
        if not config.with_suffix(".pt").exists():
            config.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by `save_checkpoint` (weights_only: no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    return torch.load(path, map_location=map_location, weights_only=True)


def resolve_resume(resume: str | None, folder: str | os.PathLike) -> Path | None:
    """`resume` from the config -> the checkpoint to load, or None to start fresh.

    None / "" / "none": start fresh. "auto": the latest checkpoint in `folder`, or fresh if
    there is none. Anything else: a path to a checkpoint file (must exist).
    """
    if resume is None or str(resume).lower() in ("", "none", "null", "false"):
        return None
    if str(resume).lower() == "auto":
        return find_latest(folder)
    path = Path(resume)
    if path.is_dir():
        latest = find_latest(path)
        if latest is None:
            raise FileNotFoundError(f"resume={resume}: no step-*.pt checkpoint in that folder")
        return latest
    if not path.is_file():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint file; use resume=auto to continue "
                                f"from the latest checkpoint of this run's output_dir")
    return path
