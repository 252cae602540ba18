"""Run logging: tqdm progress bar, a JSON-lines metrics file, and optionally wandb.

Only rank 0 logs; the other ranks get a logger whose methods do nothing. wandb is
imported only when asked for and runs offline by default (writes under the run
directory, needs no account and no network); `logger.mode=online` syncs live.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, wandb_cfg: dict | None = None,
                 config: dict | None = None, total_steps: int = 0, initial_step: int = 0, progress: bool = True,
                 run_id: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._wandb = None
        self._bar = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.metrics_path, "a", buffering=1)  # line-buffered: readable while running
        if wandb_cfg is not None:
            self._wandb = _start_wandb(self.run_dir, wandb_cfg, config, run_id)
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **record}
        self._write_line(json.dumps(_jsonable(record)) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k not in ("step", "time")}, step=step)

    def _write_line(self, line: str) -> None:
        """A metrics line. A logger must never cost the run: a write error (EIO, a full disk)
        is reported once, the file is given up and training (and its checkpoints) go on."""
        if self._file is None:
            return
        try:
            self._file.write(line)
        except OSError as e:
            self._give_up_file(e)

    def _give_up_file(self, error: OSError) -> None:
        self.write(f"warning: cannot write {self.metrics_path} ({error.strerror or error}); training goes on "
                   f"without it (checkpoints are still written)")
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:
            pass

    def progress(self, steps: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(steps)
            if postfix:
                self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)

    def log_image(self, key: str, path: Path, step: int, caption: str = "") -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(str(path), caption=caption)}, step=step)

    def write(self, message: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            for k, v in values.items():
                self._wandb.summary[k] = v

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            try:
                self._file.close()  # flushes: may fail the same way
            except OSError as e:
                self._file = None
                self.write(f"warning: cannot write {self.metrics_path} ({e.strerror or e}) at the end of the run")
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(run_dir: Path, cfg: dict, config: dict | None, run_id: str | None = None):
    """One wandb run per training run: its id is the run's, so a resumed run continues it
    (offline runs merge on `wandb sync`); named `logger.run_name`, else the run directory."""
    import wandb

    mode = cfg.get("mode", "offline")
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"logger.mode must be offline, online or disabled, got {mode!r}")
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.get("project", "sparse-mae"),
        entity=cfg.get("entity"),
        name=cfg.get("run_name") or run_dir.name,
        id=run_id,
        resume="allow" if run_id else None,
        tags=list(cfg.get("tags") or []),
        mode=mode,
        dir=str(run_dir),
        config=config,
        reinit="finish_previous",
    )


def _jsonable(record: dict) -> dict:
    out = {}
    for k, v in record.items():
        if hasattr(v, "item"):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)  # JSON has no NaN/inf
        out[k] = v
    return out


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return v
