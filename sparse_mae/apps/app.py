"""What every app's entry point shares: composing its config, `--help`, and turning errors
into messages and exit codes.

Two kinds of apps:
- runs (pretrain, finetune, bench) go through `hydra.main`, for its run directory and
  `-m` sweeps: `hydra_main(app, fn)`;
- one-shot tools (eval, export, import) compose their config with Hydra's compose API:
  `tool_main(app, fn)`.

Exit codes: 0 done; 1 an unexpected error (traceback); 2 bad input or config (the message
names the fix); 3 the run stopped itself (non-finite training, a run directory or prepare's
out in use); 75 stopped on a signal with the work so far kept: a checkpoint written (run
again with resume=auto; sparse_mae/train/signals.py), or prepare's committed shards (run the
same command again; sparse_mae/apps/prepare.py); 128 + N killed by a second signal N.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

from omegaconf import DictConfig, OmegaConf

import sparse_mae.config as schemas
from sparse_mae.errors import RunStopped
from sparse_mae.train.signals import (
    DEFAULT_STOP_SIGNALS,
    EXIT_INTERRUPTED,
    PhaseAbandoned,
    RunInterrupted,
    StopRequest,
    parse_signals,
)

CONFIG_MODULE = "sparse_mae_conf"
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3


def compose(app: str, overrides: list[str] | None = None, check: bool = True) -> DictConfig:
    """The config `sparse-mae <app> <overrides>` would use, without starting Hydra's app
    (for tools, tests and notebooks). A run's output goes to its `output_dir` override.
    Hydra checks keys, types and choices; `check` also checks the schemas' ranges."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(config_name=app, overrides=list(overrides or []))
    if check:
        schemas.validate(cfg)
    return cfg


def require_all(cfg: DictConfig) -> None:
    """A clear error for the mandatory keys (???) left unset."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required option(s) {', '.join(missing)}: pass them as key=value")


def help_text(app: str, argv: list[str]) -> str:
    """The app's config file comment (what it does, examples), then every key with its
    current value and help, composed with the overrides given so far."""
    from importlib.resources import files

    text = files(CONFIG_MODULE).joinpath(f"{app}.yaml").read_text().splitlines()
    header = [line for line in text if line.startswith("#")]
    groups = [m[1] for line in text if (m := re.match(r"^\s+- ([\w/@]+): ", line))]
    cfg = compose(app, [a for a in argv if a not in ("-h", "--help")], check=False)
    title = "options (key=value" + (f"; groups, chosen with group=option: {', '.join(groups)}" if groups else "") + "):"
    return "\n".join(header + ["", title] + ["  " + line for line in schemas.describe(cfg)])


def report(app: str, error: BaseException) -> int:
    """Print an expected error as one message; -> its exit code."""
    print(f"sparse-mae {app}: error: {error}", file=sys.stderr, flush=True)
    return EXIT_STOPPED if isinstance(error, RunStopped) else EXIT_BAD_INPUT


EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RunStopped)


def tool_main(app: str, fn: Callable[[DictConfig], int | None]) -> int:
    """Entry point of a compose-API tool: `--help`, compose, check, run `fn(cfg)`."""
    from hydra.errors import ConfigCompositionException

    argv = sys.argv[1:]
    try:
        if any(a in ("-h", "--help") for a in argv):
            print(help_text(app, argv))
            return 0
        cfg = compose(app, argv)
        require_all(cfg)
        return int(fn(cfg) or 0)
    except ConfigCompositionException as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        return report(app, ValueError(f"{e}{cause}"))
    except EXPECTED_ERRORS as e:
        return report(app, e)


def interruptible(app: str, fn: Callable[[DictConfig, StopRequest], int | None]) -> Callable[[DictConfig], int]:
    """A tool whose work is long (eval, probe): `fn(cfg, stop)` reads its batches through
    `until_stopped(..., stop)`. A stop signal abandons the work at the next batch: one line,
    exit 75 (nothing is written; run the same command again); a second signal exits at once."""

    def run(cfg: DictConfig) -> int:
        stop = StopRequest(parse_signals(DEFAULT_STOP_SIGNALS)).install()
        try:
            return int(fn(cfg, stop) or 0)
        except PhaseAbandoned as e:
            print(f"sparse-mae {app}: {e}; nothing was written; run the same command again", file=sys.stderr,
                  flush=True)
            return EXIT_INTERRUPTED
        finally:
            stop.work_is_safe()
            stop.uninstall()

    return run


def hydra_main(app: str, fn: Callable[[DictConfig, str], object]) -> int:
    """Entry point of a run app: `--help` is ours (every key with its help); everything else
    is Hydra's (`-m` sweeps, `hydra.*` overrides, its run directory), which calls
    `fn(cfg, run_dir)` once per job. Expected errors end the job with a message and code.

    A config Hydra rejects (unknown key, wrong type, bad choice) exits 2 like any bad input
    (Hydra itself exits 1, which a requeue script would read as a crash). In a `-m` sweep run
    in this process, a failed job does not stop the others: the failures are listed at the
    end and the exit code is the highest of theirs (under a cluster launcher every job is
    its own process and ends with its own code)."""
    import traceback

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(help_text(app, argv))
        return 0
    for arg in argv:  # before Hydra: it would already log into the run directory (here: the cwd)
        problem = schemas.check_output_dir(arg.split("=", 1)[1]) if arg.startswith("output_dir=") else None
        if problem and "," not in arg:  # (a sweep over output_dir: each job checks its own)
            return report(app, ValueError(problem))
    started: list[bool] = []
    failed: list[tuple[str, int]] = []

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=app)
    def _job(cfg: DictConfig) -> None:
        started.append(True)
        hc = HydraConfig.get()
        in_process_sweep = hc.mode == RunMode.MULTIRUN and "BasicLauncher" in str(hc.launcher.get("_target_", ""))
        try:
            schemas.validate(cfg)
            fn(cfg, hc.runtime.output_dir)
            return
        except EXPECTED_ERRORS as e:
            code = report(app, e)
        except RunInterrupted:  # the engine has said where it stopped
            code = EXIT_INTERRUPTED
        except Exception:  # noqa: BLE001 - in a sweep: the others still run
            if not in_process_sweep:
                raise
            traceback.print_exc()
            code = 1
        if not in_process_sweep or code == EXIT_INTERRUPTED:  # a signal stops the whole sweep
            sys.exit(code)
        failed.append((f"#{hc.job.num} {' '.join(hc.overrides.task)}", code))

    try:
        _job()
    except SystemExit as e:
        if e.code == 1 and not started:  # Hydra rejected the config before any job ran
            print(f"sparse-mae {app}: error: the config above is not valid (see `sparse-mae {app} --help` for the "
                  f"keys, types and choices)", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
        raise
    if failed:
        print(f"sparse-mae {app}: {len(failed)} of {len(started)} sweep jobs failed:\n"
              + "\n".join(f"  {job}: exit {code}" for job, code in failed), file=sys.stderr, flush=True)
        return max(code for _, code in failed)
    return 0
