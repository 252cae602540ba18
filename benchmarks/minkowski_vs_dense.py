"""FCMAE forward+backward seconds: backend="minkowski" vs "dense_masked", same weights and mask.

    .venv/bin/python benchmarks/minkowski_vs_dense.py                  # atto, batch 16, 224, mask 0.6
    .venv/bin/python benchmarks/minkowski_vs_dense.py --variant debug --batch 4 --repeats 3

Reports the median of `--repeats` timed steps after one warm-up step. Wall-clock on a
shared CPU: treat the numbers as rough.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparse_mae import create_model


def time_step(model, imgs, mask, repeats: int) -> list[float]:
    times = []
    for step in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _, _ = model(imgs, mask=mask)
        loss.backward()
        if step > 0:  # the first step warms caches and allocators
            times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="atto")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backends", nargs="+", default=["minkowski", "dense_masked"])
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = create_model(f"fcmae_convnextv2_{args.variant}", backend="dense_masked", mask_ratio=args.mask_ratio)
    imgs = torch.randn(args.batch, 3, args.size, args.size)
    mask = model.random_masking(args.batch, (args.size // 32) ** 2, generator=torch.Generator().manual_seed(0))
    print(f"{args.variant}, batch {args.batch}, {args.size}px, mask {args.mask_ratio}, "
          f"{torch.get_num_threads()} threads, fwd+bwd seconds (median of {args.repeats})")
    for backend in args.backends:
        model.set_backend(backend)
        times = time_step(model, imgs, mask, args.repeats)
        print(f"  {backend:>12}: {statistics.median(times):.3f} s  (min {min(times):.3f}, max {max(times):.3f})")


if __name__ == "__main__":
    main()
