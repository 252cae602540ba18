"""`sparse-mae newest-step <pretrain|finetune> [overrides]`: print the step of the newest
checkpoint in the run's output_dir that matches its record (0: none yet).

The run's command line is given as it is, so output_dir is found the way the run finds it
(from the command line, an experiment= or the defaults): the config is composed, not
parsed by hand. tools/slurm/train.sbatch asks before and after each start whether the run
made progress (requeue only then), and whether a requeued branch (resume=<checkpoint>) has
checkpoints of its own to continue from.

An output_dir that is not the same at every start (the default's ${now:...}) is refused
(exit 2): a requeued job would start afresh in a new directory.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from sparse_mae.apps.app import EXIT_BAD_INPUT, compose, report

APPS = ("pretrain", "finetune")


def newest_step(app: str, overrides: list[str]) -> int:
    from sparse_mae.train.checkpoint import newest_verified_step

    cfg = compose(app, overrides, check=False)
    raw = OmegaConf.to_container(cfg, resolve=False).get("output_dir")
    if isinstance(raw, str) and "${now:" in raw:
        raise ValueError(f"output_dir is {raw}, a new directory at every start: a requeued job would not continue "
                         f"its run. Name the run directory, e.g. output_dir=runs/atto")
    return newest_verified_step(Path(str(cfg.output_dir)) / "checkpoints")


def main() -> int:
    from hydra.errors import ConfigCompositionException

    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else EXIT_BAD_INPUT
    app, overrides = argv[0], argv[1:]
    if app not in APPS:
        return report("newest-step", ValueError(f"{app!r} is not a training command; use one of {', '.join(APPS)}"))
    try:
        print(newest_step(app, overrides))
    except ConfigCompositionException as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return report("newest-step", ValueError(f"{e}{cause}"))
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        return report("newest-step", e)
    return 0
