"""Compile every Triton kernel ahead of time for a CUDA target, with no GPU needed.

Triton's CPU interpreter checks what the kernels compute but not that they compile:
typing, layouts and lowering only happen in the real compiler. This builds each kernel of
ops/rows_*, in every dtype and constexpr variant their launchers use, down to a cubin for
the given architecture (Triton ships its own ptxas), so a CPU-only machine catches
compile errors.

    python -m sparse_mae_kernels.triton_aot [--arch 90]

Must run in a process where TRITON_INTERPRET is off when Triton is first imported.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

FEATURES = ("fp32", "fp16", "bf16")


def _block_cs(limit: int) -> list[int]:
    """The narrowest and the widest channel block a launcher picks (the layouts in between lower
    the same way; compiling each would double the time of this check)."""
    from sparse_mae_kernels.triton_runtime import block_c

    return sorted({block_c(1, limit), block_c(1 << 20, limit)})


def _variants():
    """(kernel, signature, constexprs) for every launch configuration of the ops' launchers."""
    from sparse_mae_kernels.ops import rows_dwconv as dw
    from sparse_mae_kernels.ops import rows_dwconv_layernorm as dwln
    from sparse_mae_kernels.ops import rows_gather_conv as gc
    from sparse_mae_kernels.ops import rows_grn as grn
    from sparse_mae_kernels.ops import rows_layernorm as ln
    from sparse_mae_kernels.ops import rows_residual as res
    from sparse_mae_kernels.triton_runtime import BLOCK_M

    for feat in FEATURES:
        for has_bias, bc in itertools.product((True, False), _block_cs(dw.DWCONV_MAX_BLOCK_C)):
            yield dw.dwconv_gather_kernel, {
                "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": f"*{feat}",
                "M": "i32", "C": "i32", "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"HAS_BIAS": has_bias, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}
            yield dw.dwconv_weight_grad_kernel, {
                "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "g_ptr": f"*{feat}", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
                "M": "i32", "C": "i32", "rows_per_chunk": "i32",
                "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"HAS_BIAS": has_bias, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}
        for has_bias, bc in itertools.product((True, False), _block_cs(dwln.FUSED_MAX_BLOCK_C)):
            yield dwln.dwconv_layernorm_kernel, {
                "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "w_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": f"*{feat}",
                "lnw_ptr": "*fp32", "lnb_ptr": "*fp32", "z_ptr": f"*{feat}", "mean_ptr": "*fp32",
                "rstd_ptr": "*fp32", "M": "i32", "C": "i32", "eps": "fp32",
                "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"HAS_BIAS": has_bias, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}
        for has_rows, bc in itertools.product((True, False), _block_cs(ln.LN_MAX_BLOCK_C)):
            rows = "*i64" if has_rows else "*fp32"
            consts = {"HAS_ROWS": has_rows, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}
            yield ln.layernorm_forward_kernel, {
                "x_ptr": f"*{feat}", "w_ptr": "*fp32", "b_ptr": "*fp32", "z_ptr": f"*{feat}", "rows_ptr": rows,
                "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "M": "i32", "C": "i32", "eps": "fp32",
                "HAS_ROWS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, consts
            yield ln.layernorm_backward_kernel, {
                "x_ptr": f"*{feat}", "w_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                "gz_ptr": f"*{feat}", "rows_ptr": rows, "gx_ptr": f"*{feat}", "M": "i32", "C": "i32",
                "HAS_ROWS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, consts
            yield ln.layernorm_param_grad_kernel, {
                "x_ptr": f"*{feat}", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "gz_ptr": f"*{feat}",
                "rows_ptr": rows, "pw_ptr": "*fp32", "pb_ptr": "*fp32", "M": "i32", "C": "i32",
                "rows_per_chunk": "i32", "HAS_ROWS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, consts
        for mode, has_bias, gelu, bc in itertools.product(range(4), (True, False), (True, False),
                                                          _block_cs(grn.SEGMENT_MAX_BLOCK_C)):
            if mode in (1, 2) and (has_bias or gelu):
                continue  # apply and the backward sums read the stored v: no prologue
            yield grn.grn_rows_kernel, {
                "h_ptr": f"*{feat}", "b_ptr": "*fp32", "g_ptr": f"*{feat}", "offsets_ptr": "*i64", "p_ptr": "*fp32",
                "q_ptr": "*fp32", "beta_ptr": "*fp32", "out_ptr": f"*{feat}", "s1_ptr": "*fp32", "s2_ptr": "*fp32",
                "N": "i32", "C": "i32", "MODE": "constexpr", "HAS_BIAS": "constexpr", "GELU": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"MODE": mode, "HAS_BIAS": has_bias, "GELU": gelu, "BLOCK_M": grn.SEGMENT_BLOCK_M, "BLOCK_C": bc}
    for feat, (bn, bk) in itertools.product(FEATURES, zip(_block_cs(gc.GATHER_CONV_MAX_BLOCK_N),
                                                           _block_cs(gc.GATHER_CONV_MAX_BLOCK_K))):
        consts = {"BLOCK_M": BLOCK_M, "BLOCK_N": bn, "BLOCK_K": bk, "DOT_FP32": False}
        yield gc.gather_conv_kernel, {
            "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "w_ptr": f"*{feat}", "out_ptr": f"*{feat}", "M": "i32", "K": "i32",
            "C_IN": "i32", "C_OUT": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
            "DOT_FP32": "constexpr",
        }, consts
        yield gc.gather_conv_weight_grad_kernel, {
            "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "g_ptr": f"*{feat}", "gw_ptr": "*fp32", "M": "i32", "K": "i32",
            "C_IN": "i32", "C_OUT": "i32", "rows_per_chunk": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
            "BLOCK_K": "constexpr", "DOT_FP32": "constexpr",
        }, consts
    # the residual: stream x and branch y of one dtype, or an fp32 stream with a low-precision branch
    pairs = [(f, f) for f in FEATURES] + [("fp32", "bf16"), ("fp32", "fp16")]
    for (x, y), has_bias, has_scale, bc in itertools.product(pairs, (True, False), (True, False),
                                                            _block_cs(res.RESIDUAL_MAX_BLOCK_C)):
        yield res.residual_forward_kernel, {
            "x_ptr": f"*{x}", "y_ptr": f"*{y}", "b_ptr": "*fp32", "s_ptr": "*fp32", "out_ptr": f"*{x}",
            "M": "i32", "C": "i32", "HAS_BIAS": "constexpr", "HAS_SCALE": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
        }, {"HAS_BIAS": has_bias, "HAS_SCALE": has_scale, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}
        yield res.residual_backward_kernel, {
            "g_ptr": f"*{x}", "s_ptr": "*fp32", "gy_ptr": f"*{y}", "gb_ptr": "*fp32", "M": "i32", "C": "i32",
            "rows_per_chunk": "i32", "HAS_SCALE": "constexpr", "HAS_BIAS": "constexpr",
            "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
        }, {"HAS_SCALE": has_scale, "HAS_BIAS": has_bias, "BLOCK_M": BLOCK_M, "BLOCK_C": bc}


def compile_all(arch: int = 90, verbose: bool = False) -> int:
    """Compile every variant to a cubin for sm_<arch>; returns how many were built."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    count = 0
    for kernel, signature, constexprs in _variants():
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"{kernel.__name__} {constexprs}: no cubin produced")
        count += 1
        if verbose:
            first = next(iter(signature.values()))
            print(f"sm_{arch} {kernel.__name__} {first} {constexprs}")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int, e.g. 80, 90")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    count = compile_all(args.arch, args.verbose)
    print(f"compiled {count} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
