"""This machine's matmul peak per dtype, measured in the same run as the configurations.

The yardstick for a configuration's share of peak: GFLOP/s of one square `a @ b` (2048 by
default) in that dtype, on the device and thread count the configurations use, median of
a few timed calls after warm-up (CUDA events on GPU). Shares computed against it hold on
any machine, where a datasheet number would not (a shared CPU, a throttled GPU).

Run as `python -m sparse_mae.bench.peak` it reads one spec as JSON on stdin and prints one
JSON line, so the runner can measure it in a fresh process like every configuration.
"""
from __future__ import annotations

import json
import statistics
import sys

import torch

from sparse_mae.bench.measure import DTYPES
from sparse_mae.bench.timing import time_calls


def matmul_peak(dtype: str, device: str, size: int = 2048, warmup: int = 2, repeats: int = 7,
                threads: int | None = None, clock=None) -> dict:
    """-> {"gflop_s": median, "best_gflop_s": best, "size": size} of a size^3 matmul in dtype.
    clock: time_calls' clock on CPU (a micro-study timing its own calls in CPU time passes the same)."""
    if threads:
        torch.set_num_threads(int(threads))
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(dev, DTYPES[dtype])
    b = torch.randn(size, size, generator=gen).to(dev, DTYPES[dtype])
    times = time_calls(lambda _: a @ b, warmup, repeats, dev, *([clock] if clock else []))
    flop = 2.0 * size**3
    return {"gflop_s": flop / statistics.median(times) / 1e9, "best_gflop_s": flop / min(times) / 1e9, "size": size}


def main() -> int:
    spec = json.loads(sys.stdin.read())
    print(json.dumps(matmul_peak(**spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
