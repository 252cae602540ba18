"""`sparse-mae <command> [args]`: one entry point, one line per app in COMMANDS.

Hydra apps read their overrides from sys.argv, so the dispatcher hands each app the rest
of the command line as its own argv.
"""
from __future__ import annotations

import importlib
import os
import sys

# command -> ("module:function", one-line help). The function takes no arguments.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("sparse_mae.apps.demo:main", "one FCMAE step per available backend on built-in images"),
    "prepare": ("sparse_mae.apps.prepare:main", "image folder -> indexed shards for data=shards (conf/sparse_mae_conf/prepare.yaml)"),
    "pretrain": ("sparse_mae.apps.pretrain:main", "FCMAE pretraining (Hydra: conf/sparse_mae_conf/pretrain.yaml; --help lists groups)"),
    "export": ("sparse_mae.apps.export:main", "our checkpoint -> sparse_mae | timm | official_dense | official_fcmae | onnx"),
    "import": ("sparse_mae.apps.import_ckpt:main", "timm / official checkpoint -> our checkpoint format"),
    "finetune": ("sparse_mae.apps.finetune:main", "fine-tune a dense classifier (Hydra: conf/sparse_mae_conf/finetune.yaml)"),
    "eval": ("sparse_mae.apps.evaluate:main", "top-1/top-5 and a confusion-matrix PNG for a classifier checkpoint"),
    "probe": ("sparse_mae.apps.probe:main", "linear probe and kNN on frozen encoder features (Hydra: conf/sparse_mae_conf/probe.yaml)"),
    "bench": ("sparse_mae.apps.bench:main", "FCMAE time, memory and FLOPs across backends (Hydra: conf/sparse_mae_conf/bench.yaml)"),
    "flops": ("sparse_mae.apps.flops:main", "params and GFLOPs of the eight variants, dense and sparse (paper table)"),
    "newest-step": ("sparse_mae.apps.newest_step:main",
                    "step of a run's newest verified checkpoint, 0: none (tools/slurm/train.sbatch asks)"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: sparse-mae <command> [args]", "", "commands:"]
    lines += [f"  {c:<{width}}  {h}" for c, (_, h) in COMMANDS.items()]
    lines += ["", "`sparse-mae <command> --help` shows a command's own options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"sparse-mae: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # torch's OpenMP threads spin 300000 times between parallel regions before they sleep;
    # on a CPU shared with other processes (or the C kernels' own threads) that made steps up
    # to 4x slower. 2000 measured best on this project's 2-core machine, and it is what
    # `sparse-mae bench` runs with. libgomp reads it once, so it is set before torch is
    # imported; a value in the environment wins.
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")
    if command in ("pretrain", "finetune", "prepare"):  # a signal in set-up or teardown (train/signals.py)
        from sparse_mae.train.signals import DEFAULT_STOP_SIGNALS, catch_outside_the_run, parse_signals

        catch_outside_the_run(parse_signals(DEFAULT_STOP_SIGNALS))
    target, _ = COMMANDS[command]
    module, func = target.split(":")
    sys.argv = [f"sparse-mae {command}", *rest]
    result = getattr(importlib.import_module(module), func)()
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
