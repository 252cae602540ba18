"""Compile every Triton kernel ahead of time for a CUDA target, with no GPU needed.

Triton's CPU interpreter checks what the kernels compute but not that they compile:
typing, layouts and lowering only happen in the real compiler. This builds each kernel,
in every dtype and constexpr variant the launchers use, down to a cubin for the given
architecture (Triton ships its own ptxas), so a CPU-only machine catches compile errors.

    python -m sparse_mae_kernels.triton_aot [--arch 90]

Must run in a process where TRITON_INTERPRET is off when Triton is first imported.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

FLOAT_TYPES = ("fp32", "fp16", "bf16")


def _variants():
    """(kernel name, signature, constexprs) for every launch configuration of triton_ops."""
    from sparse_mae_kernels import triton_ops as ops

    dw_block_cs = sorted({ops._block_c(c, ops.DWCONV_MAX_BLOCK_C) for c in (1, 32, 64, 1024)})
    seg_block_cs = sorted({ops._block_c(c, ops.SEGMENT_MAX_BLOCK_C) for c in (1, 32, 64, 128, 4096)})
    # feature dtype, parameter dtype (fp32 params with low-precision features, or matching)
    for feat, param in itertools.product(FLOAT_TYPES, ("fp32", "same")):
        param = feat if param == "same" else param
        for has_bias, block_c in itertools.product((True, False), dw_block_cs):
            yield "dwconv_gather_kernel", {
                "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "w_ptr": f"*{param}", "b_ptr": f"*{param}",
                "out_ptr": f"*{feat}", "M": "i32", "C": "i32",
                "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"HAS_BIAS": has_bias, "BLOCK_M": ops.DWCONV_BLOCK_M, "BLOCK_C": block_c}
    for feat, has_bias, block_c in itertools.product(FLOAT_TYPES, (True, False), dw_block_cs):
        yield "dwconv_weight_grad_kernel", {
            "x_ptr": f"*{feat}", "nbr_ptr": "*i32", "g_ptr": f"*{feat}", "gw_ptr": "*fp32", "gb_ptr": "*fp32",
            "M": "i32", "C": "i32", "rows_per_chunk": "i32",
            "HAS_BIAS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
        }, {"HAS_BIAS": has_bias, "BLOCK_M": ops.DWCONV_BLOCK_M, "BLOCK_C": block_c}
    for feat, with_sum, block_c in itertools.product(FLOAT_TYPES, (True, False), seg_block_cs):
        yield "segment_sums_kernel", {
            "u_ptr": f"*{feat}", "v_ptr": f"*{feat}", "offsets_ptr": "*i64", "prod_ptr": "*fp32",
            "sum_ptr": "*fp32", "N": "i32", "C": "i32",
            "WITH_SUM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
        }, {"WITH_SUM": with_sum, "BLOCK_M": ops.SEGMENT_BLOCK_M, "BLOCK_C": block_c}
    # forward: out = x * p + beta; backward: out = dy * p + x * q
    for feat, param, block_c in itertools.product(FLOAT_TYPES, ("fp32", "same"), seg_block_cs):
        param = feat if param == "same" else param
        for has_v, has_r in ((False, True), (True, False)):
            yield "segment_affine_kernel", {
                "u_ptr": f"*{feat}", "p_ptr": "*fp32", "v_ptr": f"*{feat}", "q_ptr": "*fp32",
                "r_ptr": f"*{param}", "offsets_ptr": "*i64", "out_ptr": f"*{feat}", "C": "i32",
                "HAS_V": "constexpr", "HAS_R": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
            }, {"HAS_V": has_v, "HAS_R": has_r, "BLOCK_M": ops.SEGMENT_BLOCK_M, "BLOCK_C": block_c}


def compile_all(arch: int = 90, verbose: bool = False) -> int:
    """Compile every variant to a cubin for sm_<arch>; returns how many were built."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from sparse_mae_kernels import triton_kernels

    target = GPUTarget("cuda", arch, 32)
    count = 0
    for name, signature, constexprs in _variants():
        kernel = getattr(triton_kernels, name)
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"{name} {constexprs}: no cubin produced")
        count += 1
        if verbose:
            print(f"sm_{arch} {name} {signature['x_ptr' if 'x_ptr' in signature else 'u_ptr']} {constexprs}")
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
