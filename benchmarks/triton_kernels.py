"""Triton kernels vs the torch alternatives on CUDA, per encoder stage (not a test).

    .venv/bin/python benchmarks/triton_kernels.py                          # base, batch 64, bf16
    .venv/bin/python benchmarks/triton_kernels.py --variant atto --batch 16 --dtype float32

For each stage of the variant at 224x224 (grids 56/28/14/7), a random patch mask at
`--mask-ratio` gives the visible sites; then, forward + backward of
- the submanifold depthwise 7x7 on C channels: Triton `sparse_dwconv`; the native
  engine's torch path (halo tiles + cuDNN depthwise conv, what runs with
  SPARSE_MAE_TRITON=0); `sparse_dwconv_reference`; and the dense depthwise conv over the
  whole map (what dense_masked runs),
- GRN on 4C channels: Triton `segment_grn`; the engine's torch `segment_grn`;
  `segment_grn_reference`; the model's dense GRN over the whole map.
Times are the median of CUDA-event timings after warm-up. On a machine without CUDA it
says so and exits (on CPU the kernels only run in Triton's slow interpreter).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

STAGE_GRIDS = (56, 28, 14, 7)  # sites per side at 224 px
STAGE_SIDE = (8, 4, 2, 1)  # sites per patch side


def time_ms(fn, device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of fn(); CUDA events on the GPU, perf_counter for the CPU smoke run."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) forward and backward with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    grad_out = torch.randn_like(fn(*leaves))

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return run


def random_mask(batch: int, rows: int, ratio: float, device) -> torch.Tensor:
    """(N, rows, rows) patch mask, 1 = removed, the same number kept in every sample."""
    keep = max(1, int(rows * rows * (1 - ratio)))
    order = torch.rand(batch, rows * rows, device=device).argsort(dim=1)
    mask = torch.ones(batch, rows * rows, device=device)
    mask.scatter_(1, order[:, :keep], 0.0)
    return mask.view(batch, rows, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="base")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow, memory-hungry) references")
    parser.add_argument("--device", default="cuda",
                        help="cuda; or cpu with TRITON_INTERPRET=1 as a smoke run of this script (tiny sizes, "
                             "timings meaningless)")
    args = parser.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/triton_kernels.py needs a CUDA GPU: on CPU the Triton kernels only run in "
              "Triton's interpreter (see tests/test_triton_kernels.py); nothing to time here.")
        return 0

    from sparse_mae.backends.native.layout import SparseLayout
    from sparse_mae.models.convnextv2 import VARIANTS
    from sparse_mae_kernels import sparse_ops
    from sparse_mae_kernels import triton_ops as ops

    if not ops.triton_available(dev):
        print(f"Triton is not usable on {dev} (not installed, GPU compute capability < 7.0, "
              "or on CPU TRITON_INTERPRET=1 not set)")
        return 1
    dtype = getattr(torch, args.dtype)
    dims = VARIANTS[args.variant].dims
    torch.manual_seed(0)
    mask = random_mask(args.batch, 7, args.mask_ratio, dev)
    layout = SparseLayout(mask)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (Triton interpreter smoke run)"
    print(f"{name} | triton ops vs torch | {args.variant}, batch {args.batch}, "
          f"224 px, mask {args.mask_ratio}, {args.dtype}, fwd+bwd ms (median of {args.reps})")
    header = f"{'stage':>5} {'op':>7} {'rows':>7} {'C':>5} | {'triton':>8} {'torch-tiles':>11} {'reference':>9} {'dense':>8} | {'vs tiles':>8} {'vs dense':>8}"
    print(header)
    print("-" * len(header))

    def timed(fn):
        return time_ms(fn, dev, args.warmup, args.reps)

    for i, (dim, grid, side) in enumerate(zip(dims, STAGE_GRIDS, STAGE_SIDE)):
        st = layout.stage(i)
        nbr, offsets = st.neighbour_map(), st.row_offsets
        rows, patches = nbr.shape[0], layout.num_patches
        x = torch.randn(rows, dim, device=dev, dtype=dtype)
        weight = torch.randn(dim, 49, device=dev) * 0.1
        bias = torch.randn(dim, device=dev)

        t_triton = timed(fwd_bwd(lambda x, w, b: ops.sparse_dwconv(x, nbr, w, b), [x, weight, bias]))
        t_tiles = timed(fwd_bwd(
            lambda x, w, b: sparse_ops.tile_dwconv(x.view(patches, side, side, dim), st.halo_index, w.view(dim, 1, 7, 7), b),
            [x, weight, bias]))
        t_ref = float("nan") if args.no_reference else timed(
            fwd_bwd(lambda x, w, b: ops.sparse_dwconv_reference(x, nbr, w, b), [x, weight, bias]))
        dense_x = torch.randn(args.batch, dim, grid, grid, device=dev, dtype=dtype).to(memory_format=torch.channels_last)
        t_dense = timed(fwd_bwd(
            lambda x, w, b: torch.nn.functional.conv2d(x, w.to(dtype).view(dim, 1, 7, 7), b.to(dtype), padding=3, groups=dim),
            [dense_x, weight, bias]))
        print(f"{i + 1:>5} {'dwconv':>7} {rows:>7} {dim:>5} | {t_triton:8.3f} {t_tiles:11.3f} {t_ref:9.3f} {t_dense:8.3f} | "
              f"{t_tiles / t_triton:7.2f}x {t_dense / t_triton:7.2f}x")

        hidden = 4 * dim
        h = torch.randn(rows, hidden, device=dev, dtype=dtype)
        gamma, beta = torch.randn(hidden, device=dev), torch.randn(hidden, device=dev)
        t_triton = timed(fwd_bwd(lambda h, g, b: ops.segment_grn(h, offsets, g, b), [h, gamma, beta]))
        t_tiles = timed(fwd_bwd(
            lambda h, g, b: sparse_ops.segment_grn(h.view(patches, side * side, hidden), layout.patch_sample, layout.batch, g, b),
            [h, gamma, beta]))
        t_ref = float("nan") if args.no_reference else timed(
            fwd_bwd(lambda h, g, b: ops.segment_grn_reference(h, offsets, g, b), [h, gamma, beta]))
        dense_h = torch.randn(args.batch, grid, grid, hidden, device=dev, dtype=dtype)

        def dense_grn(h, g, b):  # the model's GRN over the whole NHWC map, gamma/beta as inputs
            gx = torch.linalg.vector_norm(h, dim=(1, 2), keepdim=True)
            return h + b + g * (h * (gx / (gx.mean(-1, keepdim=True) + 1e-6)))

        t_dense = timed(fwd_bwd(dense_grn, [dense_h, gamma, beta]))
        print(f"{i + 1:>5} {'grn':>7} {rows:>7} {hidden:>5} | {t_triton:8.3f} {t_tiles:11.3f} {t_ref:9.3f} {t_dense:8.3f} | "
              f"{t_tiles / t_triton:7.2f}x {t_dense / t_triton:7.2f}x")
    if dev.type == "cuda":
        print(f"peak CUDA memory {torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
