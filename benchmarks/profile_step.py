"""Where a training step's time goes: torch.profiler's operator table of one step of each
configuration of a `sparse-mae bench` grid, after the grid's warm-up steps.

    .venv/bin/python benchmarks/profile_step.py                                   # bench=backends
    .venv/bin/python benchmarks/profile_step.py backends=[native] variants=[tiny] dtypes=[bfloat16]

Arguments are `sparse-mae bench` overrides (preset bench=backends unless one is given); the
step is the one the bench times (sparse_mae.bench.measure.PretrainStep: the engine's own
training step), so a table explains a row of the bench. The timings themselves:
`sparse-mae bench bench=backends`.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from sparse_mae.apps.bench import compose_config
from sparse_mae.bench.measure import PretrainStep
from sparse_mae.bench.runner import GRID_KEYS, plan, settings_from, skip_reason

DEFAULT_PRESET = "bench=backends"


def profile_step(spec: dict, rows: int) -> str:
    """The operator table of one training step of `spec` (a bench configuration)."""
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    run = PretrainStep(spec)
    for k in range(spec["warmup"]):
        run.step(k)
    on_gpu = spec["device"] == "cuda"
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run.step(spec["warmup"])
        if on_gpu:
            torch.cuda.synchronize()
    # on a GPU the host's time is mostly launches: rank by the device's
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help=f"sparse-mae bench overrides (default preset: {DEFAULT_PRESET})")
    parser.add_argument("--rows", type=int, default=25, help="operators listed per configuration")
    args = parser.parse_args(argv)
    overrides = args.overrides
    if not any(o.startswith("bench=") for o in overrides):
        overrides = [DEFAULT_PRESET, *overrides]
    settings = settings_from(compose_config(overrides))
    for spec in plan(settings):
        label = " ".join(f"{k}={spec[k]}" for k in GRID_KEYS)
        reason = skip_reason(spec["backend"], spec["dtype"], spec["device"])
        if reason is not None:
            print(f"{label}: skipped, {reason}")
            continue
        print(f"{label}, {spec['image_size']}px on {spec['device']}: one step after {spec['warmup']} warm-up")
        print(profile_step(spec, args.rows), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
