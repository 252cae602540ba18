"""The gathered convolution of a sparse ResNet (`rows_gather_conv`) against the torch alternatives,
at ResNet-50's 3x3 convolution shapes (not a test).

    .venv/bin/python benchmarks/gather_conv.py                      # bf16, batch 8, mask 0.6
    .venv/bin/python benchmarks/gather_conv.py --dtype float32 --split

For each stage's 3x3 submanifold conv (56x56x64, 28x28x128, 14x14x256, 7x7x512 at 224 px) and
the strided 3x3 / 1x1 / 7x7 stem convs, a random patch mask (32 px patches) at --mask-ratio
gives the visible sites; then forward and forward + backward of:
- kernel: `rows_gather_conv` (C gather + oneDNN GEMM, map checks off as the engine calls it);
- reference: `rows_gather_conv_reference` (torch indexing + one matmul);
- dense: F.conv2d over the whole zero-filled map (channels_last), what masked dense runs.
GFLOP/s count the GEMM work the kernel does (2 * M_out * K * C_in * C_out per product: taps at
absent sites included, as the GEMM runs them), against this machine's matmul peak in the same
dtype (sparse_mae.bench.peak). --split times the kernel's parts: the gather alone, the GEMM
alone, and the input gradient's two ways (gather through the transposed map then GEMM, vs
GEMM then a deterministic scatter-add).
Times are medians after warm-up (wall time; CPU time of this thread with --threads 1).

Recorded on AMD EPYC (Zen 4, AVX-512 + bf16), 2 cores shared with other jobs (load 7-11), so
with --threads 1 (CPU time of this thread; wall times on both cores swung 3-5x with the other
load): batch 8, mask 0.6, ms forward + backward (kernel / reference / dense F.conv2d), the
kernel's GFLOP/s and share of the matmul peak measured in the same run (bf16 ~195; fp32 74,
itself slowed by the load: shares over 100% say so):

    layer                bf16: kernel    ref  dense  GFLOP/s     fp32: kernel    ref  dense  GFLOP/s
    stem 7x7 s2                  16.6   53.6   26.1   88 46%           29.6   44.1   45.8   50  67%
    layer1 3x3 56x56x64          16.3   49.3   27.5  132 69%           30.3   53.1   56.8   71  96%
    layer2 3x3 s2 ->28x28x128    16.0   34.1   31.4  134 70%           36.1   32.2   63.1   60  81%
    layer2 3x3 28x28x128         14.6   32.2   26.2  147 77%           24.3   30.5   56.3   88 120%
    layer2 down 1x1 s2 ->512     12.7   28.0   29.4  151 78%           24.3   26.8   58.3   79 107%
    layer3 3x3 14x14x256         14.0   28.4   29.6  154 80%           28.9   35.2   56.8   75 101%
    layer4 3x3 7x7x512           18.5   41.8   36.3  116 60%           31.0   30.0   68.4   69  94%

In bf16 the kernel is 1.6-2.3x faster than dense (the FLOP bound at mask 0.6, 19 of 49
patches kept, is 2.6x) and 2.0-3.2x faster than the reference (which computes in fp32); in
fp32 1.6-2.4x faster than dense and 0.9-1.8x the reference (the same gather and GEMM, in
torch, where the fused kernel is not used). --split: the fused gather-GEMM (stem, layer1; in
fp32 also layer2) against gather + oneDNN, and the gather's share of the latter (1-14%
outside the stem, about half there: rows of 3 channels).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from sparse_mae.bench.peak import matmul_peak
from sparse_mae.bench.report import cpu_name
from sparse_mae.bench.timing import time_calls
from sparse_mae.models.geometry import visible_count

PATCH_GRID = 7  # 224 px / 32 px patches
# (name, input grid, C_in, C_out, kernel, stride): ResNet-50's convs that read neighbours or
# stride (its stride-1 1x1 convs are plain matmuls on the rows)
LAYERS = (
    ("stem 7x7 s2", 224, 3, 64, 7, 2),  # on the pixels: no input gradient
    ("layer1 3x3", 56, 64, 64, 3, 1),
    ("layer2 3x3 s2", 56, 128, 128, 3, 2),
    ("layer2 3x3", 28, 128, 128, 3, 1),
    ("layer2 down 1x1 s2", 56, 256, 512, 1, 2),
    ("layer3 3x3", 14, 256, 256, 3, 1),
    ("layer4 3x3", 7, 512, 512, 3, 1),
)


def visible_sites(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """(M, 3) sites (sample, y, x) of a grid x grid level under the patch mask (1 = removed)."""
    side = grid // mask.shape[1]
    keep = (mask == 0).repeat_interleave(side, 1).repeat_interleave(side, 2)
    return torch.nonzero(keep)


def random_mask(batch: int, ratio: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = visible_count(PATCH_GRID * PATCH_GRID, ratio)
    mask = torch.ones(batch, PATCH_GRID * PATCH_GRID)
    for n in range(batch):
        mask[n, torch.randperm(PATCH_GRID * PATCH_GRID, generator=gen)[:keep]] = 0
    return mask.view(batch, PATCH_GRID, PATCH_GRID)


def fwd_bwd(fn, inputs, backward: bool, input_grad: bool = True):
    """A closure running fn(*inputs), and its backward with a fixed upstream gradient (for the
    first input only when input_grad)."""
    leaves = [t.detach().clone().requires_grad_(backward and (input_grad or i > 0)) for i, t in enumerate(inputs)]
    grad_out = torch.randn_like(fn(*leaves)) if backward else None

    def run():
        if not backward:
            with torch.no_grad():
                return fn(*leaves)
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(grad_out)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch (and C kernel) threads")
    parser.add_argument("--layers", default=None, help="comma-separated indices into LAYERS (default: all)")
    parser.add_argument("--split", action="store_true", help="also time the kernel's parts (gather, GEMM, grad x)")
    args = parser.parse_args(argv)

    import sparse_mae_kernels
    from sparse_mae_kernels import cpu_build
    from sparse_mae_kernels.ops import rows_gather_conv as gc

    if args.threads:
        torch.set_num_threads(args.threads)
    if not sparse_mae_kernels.use_cpu_kernels(torch.device("cpu")):
        print("the C kernels cannot run here (see sparse_mae_kernels.use_cpu_kernels)")
        return 1
    dtype = getattr(torch, args.dtype)
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter

    def timed(fn) -> float:
        """Median milliseconds of fn()."""
        return 1e3 * statistics.median(time_calls(lambda _: fn(), args.warmup, args.reps, "cpu", clock))

    peak = matmul_peak(args.dtype, "cpu", size=2048, clock=clock)["gflop_s"]
    isa = "AVX-512" if cpu_build.compiled_isa()["avx512"] else "no AVX-512"
    print(f"{cpu_name()} ({isa} build), {torch.get_num_threads()} threads | gathered conv | batch {args.batch}, "
          f"224 px, mask {args.mask_ratio}, {args.dtype}, median ms of {args.reps} | matmul peak {peak:.0f} GFLOP/s")
    header = (f"{'layer':>19} {'M_out':>6} | {'fwd kern':>8} {'ref':>8} {'dense':>8} | {'f+b kern':>8} {'ref':>8} "
              f"{'dense':>8} | {'vs ref':>6} {'vs dense':>8} | {'GFLOP/s':>7} {'peak':>5}")
    print(header)
    print("-" * len(header))
    mask = random_mask(args.batch, args.mask_ratio)
    chosen = [LAYERS[int(i)] for i in args.layers.split(",")] if args.layers else LAYERS
    splits = []
    for name, grid, c_in, c_out, kernel, stride in chosen:
        coords_in = visible_sites(mask, grid)
        coords_out = coords_in if stride == 1 else visible_sites(mask, grid // stride)
        nbr = gc.gather_conv_map(coords_out, coords_in, kernel, stride)
        m_in, m_out, taps = coords_in.shape[0], coords_out.shape[0], kernel * kernel
        x = torch.randn(m_in, c_in).to(dtype)
        weight = 0.05 * torch.randn(c_out, c_in, kernel, kernel)
        dense_x = torch.randn(args.batch, c_in, grid, grid).to(dtype).to(memory_format=torch.channels_last)

        # as the engine calls it: a submanifold map's transpose is its taps flipped
        transposed = nbr.flip(1).contiguous() if stride == 1 else None

        def kernel_fn(x, w):
            return gc.rows_gather_conv(x, nbr, w, transposed=transposed, check_values=False)

        def ref_fn(x, w):
            return gc.rows_gather_conv_reference(x, nbr, w)

        def dense_fn(x, w):
            return F.conv2d(x, w.to(dtype), stride=stride, padding=kernel // 2)

        input_grad = c_in != 3  # the stem reads the image
        times = [timed(fwd_bwd(fn, xs, backward, input_grad)) for backward in (False, True)
                 for fn, xs in ((kernel_fn, [x, weight]), (ref_fn, [x, weight]), (dense_fn, [dense_x, weight]))]
        flop = 2.0 * m_out * taps * c_in * c_out
        gflop_s = (3 if input_grad else 2) * flop / times[3] / 1e6  # forward and the gradients' GEMMs
        print(f"{name:>19} {m_out:>6} | {times[0]:8.2f} {times[1]:8.2f} {times[2]:8.2f} | {times[3]:8.2f} "
              f"{times[4]:8.2f} {times[5]:8.2f} | {times[4] / times[3]:5.2f}x {times[5] / times[3]:7.2f}x | "
              f"{gflop_s:7.0f} {gflop_s / peak:5.0%}")
        if args.split:
            w_rows = gc.weight_rows(weight, dtype)
            w_t = gc.transposed_rows(w_rows, taps)
            cols = gc.c_gather_cols(x, nbr)
            grad = torch.randn(m_out, c_out).to(dtype)
            transposed = gc.transpose_map(nbr, m_in)
            t_gather = timed(lambda: gc.c_gather_cols(x, nbr))
            t_gemm = timed(lambda: torch.mm(cols, w_rows.t()))
            fused = w_rows.numel() * w_rows.element_size() <= gc.FUSED_MAX_WEIGHT_BYTES[dtype]
            t_forward = timed(lambda: gc.c_forward(x, nbr, w_rows))  # the fused kernel where it is used
            t_gather_grad = timed(lambda: gc.c_forward(grad, transposed, w_t))
            t_scatter_grad = timed(lambda: gc.c_input_grad(grad, nbr, w_rows, m_in))
            t_transpose = timed(lambda: gc.transpose_map(nbr, m_in))
            splits.append((name, t_gather, t_gemm, t_forward if fused else None, t_gather_grad, t_scatter_grad,
                           t_transpose))
    if splits:
        print("\nforward split (ms): the C gather and oneDNN's GEMM, vs the fused gather-GEMM (where the weight is "
              "small enough for it); grad x two ways: gather through the transposed map + GEMM, vs GEMM + "
              "deterministic scatter-add; building the transposed map (once per map)")
        print(f"{'layer':>19} | {'gather':>7} {'GEMM':>7} {'gather%':>7} {'fused':>7} | {'grad x gather':>13} "
              f"{'scatter':>8} | {'transpose':>9}")
        for name, t_gather, t_gemm, t_fused, t_gg, t_sg, t_tr in splits:
            fused = f"{t_fused:7.2f}" if t_fused is not None else f"{'-':>7}"
            print(f"{name:>19} | {t_gather:7.2f} {t_gemm:7.2f} {t_gather / (t_gather + t_gemm):7.0%} {fused} | "
                  f"{t_gg:13.2f} {t_sg:8.2f} | {t_tr:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
