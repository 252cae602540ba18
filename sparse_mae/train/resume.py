"""Which checkpoint a run continues from, and loading it on every rank.

- `choose_checkpoint` (rank 0): `resume=<path>` (refused when it holds weights only, or when
  the run directory already holds later steps it would overwrite), `resume=auto` (the
  newest checkpoint that verifies, naming any it skips), or a fresh start (refused where
  checkpoints exist). The checkpoint's config is checked against the run's
  (train/resume_config.py).
- `load_on_every_rank`: every rank loads the chosen checkpoint and all check that all hold
  the same step of the same run; if one cannot, all stop together.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import DictConfig

from sparse_mae.train.checkpoint import (
    explicit_resume_path,
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    wants_auto_resume,
)
from sparse_mae.train.distributed import DistInfo
from sparse_mae.errors import RunStopped
from sparse_mae.train.resume_config import check_resume_config
from sparse_mae.train.rundir import RunDirectory


def choose_checkpoint(cfg: DictConfig, run_dir: RunDirectory,
                      identity: dict | None = None) -> tuple[str | None, dict | None]:
    """Rank 0: -> (the checkpoint to continue from: an absolute path for resume=<path>, a name
    in the run's checkpoints/ for resume=auto, so each node finds it in its own view of a
    shared output_dir; its state), or (None, None) for a fresh start. `identity`: this start's
    data (data/identity.py), compared with the checkpoint's."""
    def say(message: str) -> None:
        print(message, flush=True)

    run_dir.clean_up()
    explicit = explicit_resume_path(cfg.resume)
    if explicit is not None:
        state = load_checkpoint(explicit, map_location="cpu")
        if "optimizer" not in state:
            hint = "init=" if "init" in cfg else "pretrained="
            raise ValueError(f"resume={explicit} holds weights only (no optimizer state or step): it cannot be "
                             f"resumed. Start a new run from those weights with {hint}{explicit}")
        later = [c for c in list_checkpoints(run_dir.checkpoints) if c.step > int(state["step"])]
        if later:  # continuing here would overwrite them (same step names) or rotate them away
            raise ValueError(
                f"resume={explicit} is step {int(state['step'])}, but output_dir {run_dir.path} already holds "
                f"later checkpoints ({', '.join(c.path.name for c in later[-3:])}) that continuing there would "
                f"overwrite; nothing was changed. To branch from step {int(state['step'])}, add a new "
                f"output_dir=...; to continue from the newest, pass resume=auto")
        check_resume_config(state.get("config"), cfg, explicit, warn=say, saved_identity=state.get("data_identity"),
                            identity=identity)
        return str(explicit.resolve()), state
    if wants_auto_resume(cfg.resume):
        path, state = newest_good_checkpoint(run_dir.checkpoints, warn=say)
        if path is not None:
            check_resume_config(state.get("config"), cfg, path, warn=say, saved_identity=state.get("data_identity"),
                                identity=identity)
            return path.name, state
    else:
        run_dir.check_fresh_start()
    return None, None


def load_on_every_rank(path: Path, main_state: dict | None, di: DistInfo) -> dict:
    """Every rank: the state of the checkpoint rank 0 chose (rank 0 passes the one it read).
    All ranks check that all hold the same step of the same run; if one cannot, all raise
    RunStopped together, naming each rank's view."""
    try:
        state = main_state if di.is_main else load_checkpoint(path, map_location="cpu")
        loaded = (int(state["step"]), state.get("run_id"))
    except Exception as e:  # noqa: BLE001 - shared with the other ranks below
        state, loaded = None, f"{type(e).__name__}: {e}"
    everyone = [loaded]
    if di.enabled:
        everyone = [None] * di.world_size
        dist.all_gather_object(everyone, loaded)
    if any(isinstance(x, str) for x in everyone) or len(set(everyone)) != 1:
        raise RunStopped(
            f"the ranks could not all resume from {path}: "
            + "; ".join(f"rank {r}: {x if isinstance(x, str) else f'step {x[0]}'}" for r, x in enumerate(everyone))
            + ". Every node must see the same output_dir (a shared filesystem)")
    return state
