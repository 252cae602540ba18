"""`sparse-mae prepare` throughput (docs/data.md): images per CPU-second of one process
(workers=1, so the encode runs in this process and its CPU time is all of it), on generated
photo-like JPEGs of a few sizes, best of `--repeats` fresh prepares of the same source; and
the same command run again on the finished folder (nothing to build: every shard and its
sources verified).

    python benchmarks/prepare_speed.py [--count 96] [--repeats 3]

CPU seconds rather than wall seconds: on a shared machine the wall clock counts other
processes' work; the CPU time of this process is what a core of prepare costs.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from sparse_mae.bench.images import write_jpegs
from sparse_mae.bench.report import cpu_name
from sparse_mae.bench.timing import time_calls
from sparse_mae.data.prepare import PrepareOptions, prepare

SIZES = ((500, 375), (1600, 1200))


def time_prepare(src: Path, work: Path, repeats: int) -> tuple[float, float]:
    """-> (best CPU seconds of a fresh prepare of src, best of the same prepare run again)."""
    fresh, again = [], []
    for r in range(repeats):
        out = work / f"out{r}"
        # call 0 builds the folder, call 1 runs the same command on the finished folder
        first, second = time_calls(
            lambda k: prepare(src, out, PrepareOptions(shard_size=32), workers=1, log=lambda message: None),
            warmup=0, repeats=2, clock=time.process_time)
        fresh.append(first)
        again.append(second)
        shutil.rmtree(out)
    return min(fresh), min(again)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=96, help="JPEGs per size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_name()}; prepare workers=1, short_side 256, quality 90; best of {args.repeats}")
    print("| JPEG | images | CPU s | images per CPU-second | run again (verify only): CPU s |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for width, height in SIZES:
            src = Path(tmp) / f"src-{width}x{height}"
            write_jpegs(src, args.count, width, height, labelled=True)
            fresh, again = time_prepare(src, Path(tmp), args.repeats)
            print(f"| {width}x{height} | {args.count} | {fresh:.2f} | {args.count / fresh:.0f} | {again:.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
