"""What sparse_mae.train's engine reads, shared by pretrain and finetune: seed, device,
schedule, optimizer, checkpoints, the non-finite policy, the logger, the stop signals, and the
run directory's check."""
from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import MISSING

from sparse_mae.config.checks import NON_NEGATIVE, POSITIVE, OneOf, Range, opt
from sparse_mae.config.choices import Device, LoggerName, WandbMode


# The signals a scheduler or a terminal sends to ask a job to stop. Others are refused: a run
# that stopped on SIGCHLD would stop itself when its first DataLoader worker exits, SIGALRM,
# SIGPIPE or SIGWINCH come from the process's own doings, and KILL and STOP cannot be caught.
ALLOWED_STOP_SIGNALS = ("TERM", "INT", "USR1", "USR2", "HUP")


def parse_signals(names: Iterable[str]) -> list[signal.Signals]:
    """["TERM", "SIGUSR1", 10] -> signals; a clear error for a name this system lacks or a
    signal a run may not stop on (only ALLOWED_STOP_SIGNALS)."""
    allowed = ", ".join(ALLOWED_STOP_SIGNALS)
    out = []
    for name in names:
        text = str(name).strip().upper()
        try:
            sig = signal.Signals(int(text)) if text.isdigit() else signal.Signals[
                text if text.startswith("SIG") else f"SIG{text}"]
        except (KeyError, ValueError):
            raise ValueError(f"stop_signals: unknown signal {name!r}; use some of {allowed}") from None
        if sig.name.removeprefix("SIG") not in ALLOWED_STOP_SIGNALS:
            raise ValueError(f"stop_signals: {sig.name} is not a signal a run may stop on; use some of {allowed}")
        out.append(sig)
    return out


DEFAULT_STOP_SIGNALS = ("TERM", "INT", "USR1", "USR2")  # RunConfig.stop_signals' default, and the CLI's before a config exists


@dataclass(frozen=True)
class StopSignalNames:
    """A list of signals a run may stop on (ALLOWED_STOP_SIGNALS)."""

    def problem(self, value: Any) -> Optional[str]:
        try:
            parse_signals(value or [])
        except ValueError:
            return f"a list of signals a run may stop on, among {', '.join(ALLOWED_STOP_SIGNALS)}"
        return None


@dataclass
class LoggerConfig:
    name: LoggerName = opt(MISSING, "wandb, or none (metrics.jsonl and the progress bar only)")
    mode: WandbMode = opt("offline", "wandb: offline writes under the run directory; online syncs live")
    project: str = opt("sparse-mae", "wandb project")
    entity: Optional[str] = opt(None, "wandb entity (team); null: your default")
    run_name: Optional[str] = opt(None, "wandb run name; null: the run directory's name")
    tags: list[str] = opt([], "wandb tags")
    progress: bool = opt(True, "tqdm progress bar on stderr")


@dataclass
class OptimConfig:
    blr: float = opt(1.5e-4, "base lr: lr = blr * effective_batch / 256", POSITIVE)
    lr: Optional[float] = opt(None, "absolute lr; overrides blr when set", POSITIVE)
    betas: list[float] = opt([0.9, 0.95], "AdamW betas", Range(0, 1, high_open=True, length=2))
    weight_decay: float = opt(0.05, "AdamW weight decay (none on biases, norms, GRN, mask token)", NON_NEGATIVE)
    eps: float = opt(1.0e-8, "AdamW eps", POSITIVE)


@dataclass
class SchedConfig:
    warmup_epochs: float = opt(40.0, "linear warmup, then half-cosine to min_lr, per step", NON_NEGATIVE)
    warmup_steps: Optional[int] = opt(None, "overrides warmup_epochs when set", NON_NEGATIVE)
    min_lr: float = opt(0.0, "lr at the end of the schedule", NON_NEGATIVE)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "checkpoint cadence in optimizer steps; also written at the end", POSITIVE)
    keep_last: int = opt(3, "checkpoints of this run kept (oldest deleted first); 0 keeps all", NON_NEGATIVE)


@dataclass
class NonFiniteConfig:
    max_in_a_row: int = opt(3, "a step with a non-finite loss or gradient norm is skipped and counted; "
                               "this many in a row stop the run", POSITIVE)


@dataclass
class RunConfig:
    """Everything sparse_mae.train's engine reads."""

    seed: int = opt(0, "seeds data order, augmentation, masks and init", NON_NEGATIVE)
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    amp: str = opt("auto", "bf16 autocast: auto (on for CUDA where the backend supports it), true, false",
                   OneOf(("auto", "true", "false")))
    epochs: int = opt(MISSING, "length of the lr schedule and of the run", POSITIVE)
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (the schedule still spans epochs)",
                                   POSITIVE)
    batch_size: int = opt(MISSING, "per process; effective batch = batch_size * processes * accum_iter", POSITIVE)
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", POSITIVE)
    clip_grad: Optional[float] = opt(None, "max gradient norm, or null for none", POSITIVE)
    log_every_steps: int = opt(10, "metrics.jsonl / wandb / progress-bar averages", POSITIVE)
    output_dir: str = opt(MISSING, "the run directory: checkpoints, metrics, pictures")
    resume: Optional[str] = opt(None, "null: start fresh (refused where checkpoints exist); auto: the newest "
                                      "checkpoint of output_dir that verifies, or fresh; or a checkpoint path")
    stop_signals: list[str] = opt(list(DEFAULT_STOP_SIGNALS), "on one of these the run finishes its step, "
                                  "writes a checkpoint and exits 75 (resume=auto continues); a second one exits at "
                                  "once. USR2 is submitit's time-limit signal", StopSignalNames())
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "")
    nonfinite: NonFiniteConfig = opt(NonFiniteConfig(), "")
    optim: OptimConfig = opt(OptimConfig(), "")
    sched: SchedConfig = opt(SchedConfig(), "")
    logger: LoggerConfig = opt(LoggerConfig(), "")


def check_output_dir(value: str) -> str | None:
    """RunConfig.output_dir: an empty one made the run write into the working directory; a
    file, or a folder that cannot be written, failed inside Hydra's log handler."""
    import os
    from pathlib import Path

    if not str(value).strip():
        return "output_dir is empty; name the run directory, e.g. output_dir=runs/atto"
    path = Path(str(value)).absolute()
    if path.exists() and not path.is_dir():
        return f"output_dir={value} is a file, not a folder; pass a folder for the run (it is created if missing)"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"output_dir={value} cannot be written: {existing} is read-only for this user; pass an output_dir "
                f"on a writable filesystem")
    return None
