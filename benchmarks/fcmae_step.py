"""FCMAE training-step benchmark: dense_masked vs minkowski vs native, side by side.

    .venv/bin/python benchmarks/fcmae_step.py                      # atto and tiny, all backends
    .venv/bin/python benchmarks/fcmae_step.py --variants atto --backends native dense_masked
    .venv/bin/python benchmarks/fcmae_step.py --profile --backends native --variants tiny --dtype bfloat16  # where time goes

One step = the training engine's own step (sparse_mae.train.step.train_step, as
`sparse-mae bench` times it): FCMAE loss (under autocast for --dtype bfloat16) with
per-sample masks, backward, gradient norm, AdamW with the pretraining recipe, at 224x224,
mask ratio 0.6, batch 16, torch threads = CPU cores. Each (variant, backend) runs in a
fresh subprocess so that memory numbers do not mix: after warm-up steps we report the
median of the timed steps, and peak memory as the peak-RSS delta of that process
(getrusage ru_maxrss at the end minus the RSS just before the first step, i.e. the
activations, gradients and optimizer state a step adds on top of the model and the
input batch). Timings are wall-clock and depend on what else runs on the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

BACKENDS = ("dense_masked", "minkowski", "native")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args) -> dict:
    import torch

    from sparse_mae.bench.measure import FcmaeStep

    torch.set_num_threads(args.threads)
    run = FcmaeStep({"backend": args.backend, "variant": args.variant, "image_size": args.size,
                     "mask_ratio": args.mask_ratio, "batch_size": args.batch, "dtype": args.dtype,
                     "device": "cpu", "seed": 0})
    step = run.step  # the engine's training step (sparse_mae.train.step), as `sparse-mae bench` times it

    rss_before = _rss_mib()
    times = []
    for k in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        step(k)
        if k >= args.warmup:
            times.append(time.perf_counter() - t0)
    result = {
        "variant": args.variant, "backend": args.backend, "median_s": statistics.median(times),
        "min_s": min(times), "steps": len(times), "peak_mib": _peak_rss_mib() - rss_before,
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(0)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows), file=sys.stderr)
    return result


def availability(backend: str) -> tuple[bool, str]:
    from sparse_mae.backends import backend_availability, list_backends

    if backend not in list_backends():
        return False, "not registered in this checkout"
    return backend_availability(backend)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=["atto", "tiny"])
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one extra step")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    if args.worker:
        print(json.dumps(worker(args)))
        return

    print(f"FCMAE step (fwd+bwd+AdamW), {args.dtype}, {args.size}px, batch {args.batch}, mask {args.mask_ratio}, "
          f"{args.threads} threads, median of {args.steps} after {args.warmup} warm-up; "
          f"peak = peak-RSS delta of a fresh process")
    for variant in args.variants:
        rows = {}
        for backend in args.backends:
            ok, reason = availability(backend)
            if not ok:
                print(f"  {variant:6s} {backend:13s} skipped: {reason}")
                continue
            cmd = [sys.executable, __file__, "--worker", "--variant", variant, "--backend", backend,
                   "--batch", str(args.batch), "--size", str(args.size), "--mask-ratio", str(args.mask_ratio),
                   "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
                   "--dtype", args.dtype]
            if args.profile:
                cmd += ["--profile", "--profile-rows", str(args.profile_rows)]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if proc.returncode != 0:
                print(f"  {variant:6s} {backend:13s} FAILED (exit {proc.returncode})")
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows[backend] = r
            print(f"  {variant:6s} {backend:13s} {r['median_s']*1e3:8.0f} ms/step (min {r['min_s']*1e3:.0f})"
                  f"  peak {r['peak_mib']:7.0f} MiB", flush=True)
        if "native" in rows:
            nat = rows["native"]
            for other in ("dense_masked", "minkowski"):
                if other in rows:
                    o = rows[other]
                    print(f"  {variant:6s} native vs {other}: {o['median_s'] / nat['median_s']:.2f}x faster, "
                          f"memory {nat['peak_mib'] / max(o['peak_mib'], 1e-9):.2f}x")


if __name__ == "__main__":
    main()
