"""A run directory belongs to one run.

- `lock()`: an advisory lock (flock on `run.lock`) held for the whole run, so a second live
  writer is refused with the holder's pid and host. The kernel drops it when the holder
  dies, even by SIGKILL, so a killed run never blocks its own resume.
  Filesystems without flock (NFS without lockd, Lustre mounted `noflock`: ENOLCK, ENOSYS,
  EOPNOTSUPP) are not a held lock: there the run falls back to a lock file, `run.lock.held`,
  created exclusively and holding the holder's host and pid, its mtime refreshed every
  HEARTBEAT_S by a thread. A later run takes it over when its holder is gone: a dead pid on
  this host, or no heartbeat for STALE_AFTER_S (a killed holder on another node). One
  cost: after a SIGKILL on another node, resuming waits out STALE_AFTER_S.
- `check_fresh_start()`: starting fresh where checkpoints exist is refused (naming
  resume=auto or a new output_dir), so a reused output_dir never mixes two runs.
- `clean_up()`: temp files of a killed writer are removed (safe: the lock is held).
- metrics.jsonl: a fresh start sets an old one aside; a resume cuts it back to the
  checkpoint's step, so the file reads as one uninterrupted run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

from sparse_mae.io import FALLBACK_LOCK_NAME, LOCK_NAME, TEMP_PREFIX, atomic_write_bytes
from sparse_mae.train.checkpoint import list_checkpoints, remove_stale_files
from sparse_mae.errors import RunDirectoryInUse

NO_FLOCK_ERRNOS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0
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

    def lock(self, option: str = "output_dir") -> None:
        """`option`: the key that named this directory, for the message that refuses a second writer."""
        self.path.mkdir(parents=True, exist_ok=True)
        f = open(self.path / LOCK_NAME, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in NO_FLOCK_ERRNOS:  # the filesystem cannot lock: not someone else's lock
                f.close()
                self._lock_with_heartbeat(e, option)
                return
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirectoryInUse(
                f"{option} {self.path} is in use by {holder}; it has one writer at a time. "
                f"Wait for that run to end (or stop it), or pass another {option}") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on host {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        self._lock_file = f

    def _lock_with_heartbeat(self, flock_error: OSError, option: str) -> None:
        held = self.path / FALLBACK_LOCK_NAME
        me = f"pid {os.getpid()} on host {socket.gethostname()}"
        for _ in range(2):  # a second try after removing a stale one
            try:
                fd = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, stale = self._fallback_holder(held)
                if not stale:
                    raise RunDirectoryInUse(
                        f"{option} {self.path} is in use by {holder} (lock file {held}, its filesystem has no "
                        f"flock); it has one writer at a time. Wait for that run to end, or pass "
                        f"another {option}. If that run is surely gone, delete {held}") from None
                print(f"warning: taking over the lock of {self.path} from {holder} ({stale})", flush=True)
                held.unlink(missing_ok=True)
                continue
            os.write(fd, f"{me} (since {time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode())
            os.close(fd)
            break
        else:
            raise RunDirectoryInUse(f"{option} {self.path}: another process took {held} at the same moment")
        print(f"note: {self.path} has no flock ({os.strerror(flock_error.errno)}): locked with {held} and a "
              f"heartbeat instead", flush=True)
        self._heartbeat_stop = threading.Event()

        def beat() -> None:
            while not self._heartbeat_stop.wait(HEARTBEAT_S):
                try:
                    os.utime(held)
                except OSError:
                    pass

        self._heartbeat = threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat.start()
        self._held_file = held

    @staticmethod
    def _fallback_holder(held: Path) -> tuple[str, str | None]:
        """(who holds it, why it is stale or None)."""
        try:
            text, age = held.read_text().strip(), time.time() - held.stat().st_mtime
        except OSError:
            return "another process", "its lock file vanished"
        parts = text.split()
        if len(parts) >= 5 and parts[0] == "pid" and parts[4] == socket.gethostname() and parts[1].isdigit():
            try:
                os.kill(int(parts[1]), 0)
            except ProcessLookupError:
                return text, "that process is dead"
            except PermissionError:
                pass
        if age > STALE_AFTER_S:
            return text, f"no heartbeat for {age:.0f} s"
        return text, None

    def unlock(self) -> None:
        if getattr(self, "_held_file", None) is not None:
            self._heartbeat_stop.set()
            self._heartbeat.join()
            self._held_file.unlink(missing_ok=True)
            self._held_file = None
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
