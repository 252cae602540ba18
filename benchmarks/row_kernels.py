"""The native engine's row kernels against the torch alternatives, per encoder stage (not a test).

    .venv/bin/python benchmarks/row_kernels.py                                  # CPU: the C kernels
    .venv/bin/python benchmarks/row_kernels.py --device cuda --variant base --batch 64   # Triton

For each stage of the variant at 224x224 (grids 56/28/14/7) a random patch mask at
`--mask-ratio` gives the visible sites; then forward + backward of each fused op of a
block against what runs without it:
- dwconv+LN: `rows_dwconv_layernorm` (map checks off, as the engine calls it) vs the tile path (halo-tile depthwise conv, then
  F.layer_norm) vs dense (depthwise conv over the whole map, then LayerNorm);
- bias+GELU+GRN (4C channels): `rows_grn` with its prologue vs torch (bias add, GELU, the
  tile GRN) vs dense (bias, GELU, the model's GRN over the whole map);
- residual: `rows_residual` vs torch (x + y + bias).
Times are medians after warm-up: CUDA events on GPU, CPU time of this thread on CPU with
--threads 1 (so a shared machine's other load does not count), wall time otherwise.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparse_mae.bench.timing import time_calls
from sparse_mae.models.geometry import visible_count

STAGE_GRIDS = (56, 28, 14, 7)  # sites per side at 224 px
STAGE_SIDE = (8, 4, 2, 1)  # sites per patch side


def fwd_bwd(fn, inputs):
    """A closure running fn(*inputs) forward and backward with a fixed upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    grad_out = torch.randn_like(fn(*leaves))

    def run():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return run


def random_mask(batch: int, grid: int, ratio: float, device) -> torch.Tensor:
    keep = visible_count(grid * grid, ratio)
    mask = torch.ones(batch, grid * grid)
    for n in range(batch):
        mask[n, torch.randperm(grid * grid)[:keep]] = 0
    return mask.view(batch, grid, grid).to(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch (and C kernel) threads on CPU")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA GPU: on CPU the Triton kernels only run in Triton's interpreter "
              "(tests/test_kernels_rows.py); time the C kernels with --device cpu.")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)

    import sparse_mae_kernels
    from sparse_mae.backends.native.layout import SparseLayout
    from sparse_mae.models.convnextv2 import GRN, VARIANTS
    from sparse_mae.models.geometry import GRN_EPS, LN_EPS
    from sparse_mae_kernels.ops.rows_dwconv_layernorm import rows_dwconv_layernorm
    from sparse_mae_kernels.ops.rows_grn import rows_grn
    from sparse_mae_kernels.ops.rows_residual import rows_residual
    from sparse_mae_kernels.ops.tiles_dwconv import tiles_dwconv
    from sparse_mae_kernels.ops.tiles_grn import tiles_grn

    usable = sparse_mae_kernels.use_triton(dev) if dev.type == "cuda" else sparse_mae_kernels.use_cpu_kernels(dev)
    if not usable:
        print(f"the row kernels cannot run on {dev} (see sparse_mae_kernels.use_cpu_kernels / use_triton)")
        return 1
    dtype = getattr(torch, args.dtype)
    dims = VARIANTS[args.variant].dims
    torch.manual_seed(0)
    layout = SparseLayout(random_mask(args.batch, 7, args.mask_ratio, dev))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name} | row kernels vs torch | {args.variant}, batch {args.batch}, 224 px, mask {args.mask_ratio}, "
          f"{args.dtype}, fwd+bwd ms (median of {args.reps})")
    header = f"{'stage':>5} {'op':>14} {'rows':>7} {'C':>5} | {'kernel':>8} {'torch':>8} {'dense':>8} | {'vs torch':>8} {'vs dense':>8}"
    print(header)
    print("-" * len(header))

    # one thread: count only its CPU time, so a shared machine's other load does not
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def timed(fn) -> float:
        """Median milliseconds of fn()."""
        return 1e3 * statistics.median(time_calls(lambda _: fn(), args.warmup, args.reps, dev, clock))

    def show(stage, op, rows, c, t_kernel, t_torch, t_dense):
        print(f"{stage:>5} {op:>14} {rows:>7} {c:>5} | {t_kernel:8.2f} {t_torch:8.2f} {t_dense:8.2f} | "
              f"{t_torch / t_kernel:7.2f}x {t_dense / t_kernel:7.2f}x")

    for i, (c, grid, side) in enumerate(zip(dims, STAGE_GRIDS, STAGE_SIDE)):
        st = layout.stage(i)
        nbr, offsets = st.neighbour_map(), st.row_offsets
        rows, patches = nbr.shape[0], layout.num_patches
        x = torch.randn(rows, c, device=dev, dtype=dtype)
        weight, bias = 0.1 * torch.randn(c, 49, device=dev), torch.randn(c, device=dev)
        lw, lb = torch.randn(c, device=dev), torch.randn(c, device=dev)

        def tile_path(x, w, b, lw, lb):
            y = tiles_dwconv(x.view(patches, side, side, c), st.halo_index, w.view(c, 1, 7, 7).to(dtype), b.to(dtype))
            return F.layer_norm(y.float(), (c,), lw, lb, LN_EPS).to(dtype)

        dense_x = torch.randn(args.batch, c, grid, grid, device=dev, dtype=dtype).to(memory_format=torch.channels_last)

        def dense_path(x, w, b, lw, lb):
            y = F.conv2d(x, w.to(dtype).view(c, 1, 7, 7), b.to(dtype), padding=3, groups=c).permute(0, 2, 3, 1)
            return F.layer_norm(y.float(), (c,), lw, lb, LN_EPS).to(dtype)

        params = [weight, bias, lw, lb]
        show(i + 1, "dwconv+LN", rows, c,
             timed(fwd_bwd(lambda x, *p: rows_dwconv_layernorm(x, nbr, *p, LN_EPS, check_values=False), [x, *params])),
             timed(fwd_bwd(tile_path, [x, *params])), timed(fwd_bwd(dense_path, [dense_x, *params])))

        hidden = 4 * c
        h = torch.randn(rows, hidden, device=dev, dtype=dtype)
        gamma, beta, fc1_bias = (torch.randn(hidden, device=dev) for _ in range(3))
        grn = GRN(hidden).to(dev)

        def torch_grn(h, g, b, ib):
            v = F.gelu((h.float() + ib).to(dtype))
            return tiles_grn(v.view(patches, side * side, hidden), layout.patch_sample, layout.batch, g, b, GRN_EPS)

        dense_h = torch.randn(args.batch, grid, grid, hidden, device=dev, dtype=dtype)

        def dense_grn(h, g, b, ib):
            return torch.func.functional_call(grn, {"weight": g, "bias": b}, (F.gelu((h.float() + ib).to(dtype)),))

        show(i + 1, "bias+GELU+GRN", rows, hidden,
             timed(fwd_bwd(lambda h, g, b, ib: rows_grn(h, offsets, g, b, ib, gelu=True, eps=GRN_EPS),
                           [h, gamma, beta, fc1_bias])),
             timed(fwd_bwd(torch_grn, [h, gamma, beta, fc1_bias])),
             timed(fwd_bwd(dense_grn, [dense_h, gamma, beta, fc1_bias])))

        y = torch.randn(rows, c, device=dev, dtype=dtype)
        dense_y = torch.randn(args.batch, grid, grid, c, device=dev, dtype=dtype)
        t_torch = timed(fwd_bwd(lambda x, y, b: x + (y.float() + b).to(dtype), [x, y, bias]))
        show(i + 1, "residual", rows, c, timed(fwd_bwd(lambda x, y, b: rows_residual(x, y, b), [x, y, bias])), t_torch,
             timed(fwd_bwd(lambda x, y, b: x + (y.float() + b).to(dtype), [dense_y, dense_y, bias])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
