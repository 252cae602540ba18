"""A run directory belongs to one run.

- `lock()`: an advisory lock (flock on `run.lock`) held for the whole run, so a second live
  writer is refused with the holder's pid and host. The kernel drops it when the holder
  dies, even by SIGKILL, so a killed run never blocks its own resume.
- `check_fresh_start()`: starting fresh where checkpoints exist is refused (naming
  resume=auto or a new output_dir), so a reused output_dir never mixes two runs.
- `clean_up()`: temp files of a killed writer are removed (safe: the lock is held).
- metrics.jsonl: a fresh start sets an old one aside; a resume cuts it back to the
  checkpoint's step, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from sparse_mae.train.checkpoint import TEMP_PREFIX, atomic_write_bytes, list_checkpoints, remove_stale_files
from sparse_mae.train.errors import RunDirectoryInUse

LOCK_NAME = "run.lock"
METRICS_NAME = "metrics.jsonl"


class RunDirectoryHasCheckpoints(ValueError):
    """A fresh start was asked for in a directory that holds another run's checkpoints."""


class RunDirectory:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics = self.path / METRICS_NAME
        self._lock_file = None

    # -- the lock ----------------------------------------------------------------------

    def lock(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirectoryInUse(
                f"output_dir {self.path} is in use by {holder}; a run directory has one writer at a time. "
                f"Wait for that run to end (or stop it), or pass another output_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    # -- fresh start / resume ------------------------------------------------------------

    def check_fresh_start(self) -> None:
        found = list_checkpoints(self.checkpoints)
        if found:
            raise RunDirectoryHasCheckpoints(
                f"output_dir {self.path} already holds {len(found)} checkpoint(s) of a run (last written: "
                f"{found[-1].path.name}). Continue that run with resume=auto, or start a new run in a new "
                f"output_dir; nothing there was changed")

    def clean_up(self) -> None:
        """Remove what a killed writer left half-done: temp files anywhere in the run
        directory (ours start with TEMP_PREFIX) and checkpoint sidecars without a checkpoint."""
        remove_stale_files(self.checkpoints)
        for sub in (self.path, self.path / "reconstructions"):
            if sub.is_dir():
                for p in sub.iterdir():
                    if p.name.startswith(TEMP_PREFIX) and p.is_file():
                        p.unlink(missing_ok=True)

    def set_aside_metrics(self) -> Path | None:
        """A fresh start: an earlier metrics.jsonl (a run that wrote no checkpoint) is renamed,
        not appended to or deleted."""
        if not self.metrics.exists():
            return None
        aside = self.path / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        self.metrics.replace(aside)
        return aside

    def cut_metrics_to(self, step: int) -> None:
        """A resume from `step`: drop the records of later steps (they are run again) and a torn
        last line, so the file equals the uninterrupted run's."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a kill
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        atomic_write_bytes(self.metrics, lambda f: f.write("".join(f"{x}\n" for x in kept).encode()))
