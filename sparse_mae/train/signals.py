"""Stopping a run on a signal, as a scheduler asks (SLURM, Kubernetes, a Ctrl-C).

The protocol (docs/design.md, "Signals and requeue"):

- the first stop signal (`stop_signals`: SIGTERM, SIGINT, SIGUSR1 by default) only sets a
  flag; the step in flight finishes, the engine writes a checkpoint at that step, releases
  the run lock and the app exits with EXIT_INTERRUPTED (75, sysexits' EX_TEMPFAIL: "try
  again"), so a requeue script or submitit can start the same command with resume=auto;
- a second stop signal kills the process at once (the first one puts the signals' default
  action back, so the second works even inside a long C call or a hung collective; a
  shell sees 128 + the signal's number). Checkpoints already written are whole (they are
  renamed into place complete), a half-written one is a temp file the next run removes,
  and the kernel drops the run lock with the process;
- under DDP each rank's flag is summed over the ranks after every step, so all ranks stop
  after the same step even when the signal reached them at different moments (or only one
  of them): no rank waits in a collective another has left.

A handler that was installed before ours (submitit's requeue handler for its timeout
signal, say) is called after our checkpoint is written, so it can still requeue the job.

Once the stop's checkpoint is written, and once a run has ended, stop signals are ignored:
the work is safe and the exit code (75, or 0) decided, and a scheduler may deliver its
signal twice or late (SLURM's time-limit warning crossed a run's end in the tests and killed
the finished job as failed). Outside the loop, `sparse-mae pretrain|finetune` records stop
signals from its first line on (`catch_outside_the_run`): one during set-up makes the
engine stop before its first step (exit 75, though tools/slurm/train.sbatch requeues only a
run whose newest checkpoint moved); a second one there kills at once.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Callable, Iterable

import torch

from sparse_mae.config import DEFAULT_STOP_SIGNALS, parse_signals  # defined with stop_signals, their range check

EXIT_INTERRUPTED = 75  # stopped on a signal with a checkpoint written: run again with resume=auto


_outside = {"pending": None, "ended": False}  # the CLI's recorder and the engine share these


def catch_outside_the_run(signals: Iterable[signal.Signals]) -> None:
    """The training CLI's first act: record a stop signal instead of dying of it (see above)."""

    def record(signum: int, frame) -> None:
        if _outside["ended"]:  # the run's work is safe and its exit code decided
            return
        if _outside["pending"] is not None:
            signal.signal(signum, signal.SIG_DFL)  # a second one during set-up: at once
            signal.raise_signal(signum)
        _outside["pending"] = signal.Signals(signum)

    _outside["recorder"] = record
    for sig in signals:
        signal.signal(sig, record)


def take_pending_signal() -> signal.Signals | None:
    """The stop signal the CLI recorded during set-up, or None; the app that acts on it takes it."""
    pending, _outside["pending"] = _outside["pending"], None
    return pending


class StopRequest:
    """Installed for one run: `requested` turns true on the first stop signal; a second
    exits the process at once. `uninstall()` puts the previous handlers back."""

    def __init__(self, signals: Iterable[signal.Signals], log: Callable[[str], None] = lambda m: None):
        self.signals = list(signals)
        self.log = log
        self.received: signal.Signals | None = None
        self.received_at: float | None = None
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopRequest:
        _outside["ended"] = False  # (a sweep's next job, in the same process)
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (a notebook's worker thread): no handling
                break
        # a signal the CLI records but this run does not stop on: its default action again
        for sig in parse_signals(DEFAULT_STOP_SIGNALS):
            if sig not in self.signals and signal.getsignal(sig) is _outside.get("recorder", False):
                self._previous[sig] = signal.signal(sig, signal.SIG_DFL)
        pending = take_pending_signal()
        if pending is not None and pending in self.signals:  # came during set-up: stop before the first step
            self._handle(int(pending), None)
        return self

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, frame) -> None:
        sig = signal.Signals(signum)
        if self.received is not None:  # only when a signal came between two of the loop below
            os._exit(128 + signum)
        self.received, self.received_at = sig, time.monotonic()
        for other in self._previous:  # the next one kills at once, whatever the process is doing
            signal.signal(other, signal.SIG_DFL)
        # only a flag: printing from a handler can interleave with the progress bar, that is all
        self.log(f"received {sig.name}: finishing the step in flight, then writing a checkpoint and stopping "
                 f"(a second signal exits at once)")

    def work_is_safe(self) -> None:
        """The stop's checkpoint is written (or the run ended): from here on a stop signal,
        repeated or late, changes nothing, not even the exit code."""
        _outside["ended"] = True
        for sig in self._previous:
            signal.signal(sig, signal.SIG_IGN)

    def agreed(self, distributed: bool, device: torch.device) -> bool:
        """Whether any rank has been signalled. Under DDP a collective: every rank calls it
        at the same point of the loop (one int32 all-reduce)."""
        if not distributed:
            return self.requested
        from sparse_mae.train.distributed import any_rank

        return any_rank(self.requested, device=device)[0]

    def chain_previous(self) -> None:
        """Hand the signal to the handler that was there before ours (e.g. submitit's requeue),
        once our checkpoint is safe."""
        if self.received is None:
            return
        previous = self._previous.get(self.received)
        self.uninstall()
        if callable(previous) and previous not in (signal.default_int_handler,):
            previous(int(self.received), None)


class PhaseAbandoned(Exception):
    """A long phase between steps (evaluation, the kNN monitor, embedding, pictures) stopped
    at a batch boundary because a stop signal came; the engine checkpoints and stops, and
    runs the phase again after resume."""


def abandon_if_stopped(stop: StopRequest | None, what: str) -> None:
    """PhaseAbandoned once a stop signal has been received."""
    if stop is not None and stop.requested:
        raise PhaseAbandoned(f"{what} abandoned on {stop.received.name}")


def until_stopped(items: Iterable, stop: StopRequest | None, what: str = "this phase"):
    """`items` one by one, until a stop signal is received: then PhaseAbandoned at the next
    item, so a stop waits for one batch, not for the whole phase."""
    for item in items:
        abandon_if_stopped(stop, what)
        yield item


class RunInterrupted(Exception):
    """The run stopped on a signal after writing its checkpoint (not an error: exit 75)."""

    def __init__(self, message: str, signal_received: signal.Signals, step: int):
        super().__init__(message)
        self.signal_received = signal_received
        self.step = step


def ignore_in_worker(signals: Iterable[signal.Signals]):
    """A DataLoader worker_init_fn: workers ignore the stop signals (a scheduler signals every
    process of the job) and are shut down by the main process when it stops."""
    signals = list(signals)

    def init(_worker_id: int) -> None:
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)

    return init
