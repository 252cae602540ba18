"""`sparse-mae prepare src=<image folder> out=<shard folder>`: image folder -> indexed shards;
a src holding the Fashion-MNIST idx files -> out/train and out/val (schema:
config.PrepareConfig; the work: sparse_mae.data.prepare).

Stopping, as the training apps do: a stop signal (TERM, INT, USR1, USR2; one recorded by
the CLI during set-up counts) ends prepare within seconds with EXIT_INTERRUPTED (75) and one
line: the pool is killed, committed shards are kept and the same command continues. The
first signal puts the signals' default action back, so a second one ends the process at
once, whatever it is doing. One prepare per out: the run directories' lock (flock, or a
lock file where the filesystem has none); a second is refused with exit 3. An out that
cannot be written (a file, read-only, a full disk) is one sentence and exit 2.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.apps.app import compose, tool_main
from sparse_mae.data.prepare import PrepareOptions, holds_fashion_mnist, prepare, prepare_fashion_mnist
from sparse_mae.train.rundir import RunDirectory
from sparse_mae.train.signals import DEFAULT_STOP_SIGNALS, EXIT_INTERRUPTED, parse_signals, take_pending_signal


FINGERPRINT_SHOWN = 16  # hex digits of the data set's fingerprint printed (64 bits: enough to tell data sets apart)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    return compose("prepare", overrides)


class PrepareInterrupted(BaseException):
    """A stop signal ended prepare. A BaseException, as KeyboardInterrupt is: an `except
    Exception` on its way up (the one that lists unreadable images) must not take it."""

    def __init__(self, sig: signal.Signals):
        super().__init__(sig.name)
        self.signal = sig


@contextmanager
def stopped_by_signals(signals: list[signal.Signals]):
    """The first stop signal raises PrepareInterrupted wherever the main process is (the
    build kills its pool on the way out); after it, the signals' default actions stay, so a
    second one ends the process at once, even in the tear-down."""

    stopped = []

    def stop(signum: int, frame) -> None:
        stopped.append(signum)
        for sig in signals:
            signal.signal(sig, signal.SIG_DFL)
        raise PrepareInterrupted(signal.Signals(signum))

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        pending = take_pending_signal()
        if pending is not None and pending in signals:
            stop(int(pending), None)
        yield
    finally:
        if not stopped:  # (after a stop the default actions stay: a second signal must still end it)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


UNWRITABLE = {  # errno -> (why, what to do)
    errno.ENOSPC: ("no space left on its device", "free some space (or choose another out=)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free some space (or choose another out=)"),
    errno.EROFS: ("it is on a read-only filesystem", "choose another out="),
    errno.EACCES: ("permission denied", "choose another out= or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose another out= or fix its permissions"),
}


def cannot_write(error: OSError, out: str) -> ValueError | None:
    """An error writing out, as one sentence (None: another error, left as it is). ENOSPC,
    EDQUOT and EROFS come only from writes; EACCES and EPERM count when they name a path in out."""
    if error.errno not in UNWRITABLE:
        return None
    if error.errno in (errno.EACCES, errno.EPERM) and not (
            error.filename and Path(os.path.abspath(error.filename)).is_relative_to(os.path.abspath(out))):
        return None
    why, fix = UNWRITABLE[error.errno]
    return ValueError(f"cannot write to out={out}: {why}; {fix}, then run the same command again "
                      f"(shards already built are kept)")


def run_prepare(cfg: DictConfig) -> dict[str, dict]:
    """-> {shard folder under out ('' for out itself): its manifest}."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={cfg.out} is a file; pass a folder (a new one, or one an earlier prepare wrote)")
    lock = RunDirectory(out)
    try:
        lock.lock(option="out")
        try:
            return write_shards(cfg)
        finally:
            lock.unlock()
    except OSError as e:
        problem = cannot_write(e, cfg.out)
        if problem is None:
            raise
        raise problem from None


def write_shards(cfg: DictConfig) -> dict[str, dict]:
    from tqdm import tqdm

    from sparse_mae.config import FashionMnistImages

    options = PrepareOptions(short_side=cfg.short_side, quality=cfg.quality, shard_size=cfg.shard_size)
    bar = tqdm(unit="img", desc="prepare", disable=not cfg.progress, dynamic_ncols=True)

    def start(total: int):
        bar.total = total
        bar.refresh()
        return bar.update

    fmnist = holds_fashion_mnist(cfg.src)
    workers = cfg.workers or os.cpu_count() or 1
    try:
        if fmnist:
            manifests = prepare_fashion_mnist(cfg.src, cfg.out, options, workers, progress=start, log=bar.write)
        else:
            manifests = {"": prepare(cfg.src, cfg.out, options, workers, progress=start, log=bar.write)}
    finally:
        bar.close()
    for folder, manifest in manifests.items():
        where = os.path.join(cfg.out, folder) if folder else cfg.out
        bad = len(manifest["unreadable"])
        classes = manifest["classes"]
        print(f"{where}: {manifest['samples']} images in {len(manifest['shards'])} shards"
              + (f", {len(classes)} classes" if classes else ", no labels")
              + (f"; {bad} unreadable file(s) skipped, listed in {os.path.join(where, 'unreadable.txt')}" if bad else "")
              # the data set's identity (its content; docs/data.md): the same wherever the folder lies
              + f"; fingerprint {manifest['fingerprint'][:FINGERPRINT_SHOWN]}")
    if fmnist:  # the shards hold 32px images; the apps' Fashion-MNIST size is not the shards' default
        size = f"data.size={FashionMnistImages.size}"
        print(f"Fashion-MNIST at 32px, lossless: finetune / probe with finetune/data@data=shards data.root={cfg.out} "
              f"{size}; pretrain with data=shards data.root={os.path.join(cfg.out, 'train')} {size}")
    return manifests


def main() -> int:
    try:
        with stopped_by_signals(parse_signals(DEFAULT_STOP_SIGNALS)):
            return tool_main("prepare", lambda cfg: run_prepare(cfg) and 0)
    except PrepareInterrupted as stop:
        print(f"sparse-mae prepare: stopped by {stop.signal.name}; the shards built so far are kept: run the same "
              f"command again to continue", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
