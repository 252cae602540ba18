"""Depthwise 7x7 with a LayerNorm epilogue on packed rows: the first half of a ConvNeXt block.

    y = rows_dwconv(x, nbr, weight, bias);  z = rows_layernorm(y, ln_weight, ln_bias, eps)

in one pass: each output row of the conv is finished in registers, rounded to the compute
dtype and stored (the backward needs it), then normalised from the stored values (what a
separate LayerNorm would read) and z written, without y making a second trip through
memory. The backward runs the LayerNorm backward, then the conv's flipped-tap gather and
weight gradient (their launchers live in rows_layernorm.py and rows_dwconv.py).

In this file: the reference (the two references in sequence), the fused C launch (the C
kernel of csrc/rows_dwconv.c with its epilogue on), the fused Triton kernel, the autograd
function. Dtypes as in its two parts: features in the compute dtype, parameters float32.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels.common import check_vector, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.constants import TAPS
from sparse_mae_kernels.ops import rows_dwconv as dw
from sparse_mae_kernels.ops import rows_layernorm as ln
from sparse_mae_kernels.triton_runtime import BLOCK_M, block_c, cdiv, tl, triton

FUSED_MAX_BLOCK_C = 64


def rows_dwconv_layernorm_reference(x, nbr, weight, bias, ln_weight, ln_bias, eps: float):
    """Plain torch: the conv's reference, then the LayerNorm's."""
    return ln.rows_layernorm_reference(dw.rows_dwconv_reference(x, nbr, weight, bias), ln_weight, ln_bias, eps)


# -- C: the conv kernel with its epilogue (csrc/rows_dwconv.c) ---------------------------


def c_forward(x, nbr, w_taps, bias32, ln_w32, ln_b32, eps, dtype):
    return dw.c_forward(x, nbr, w_taps, bias32, dtype, layernorm=(ln_w32, ln_b32, eps, dtype))


# -- Triton ------------------------------------------------------------------------------

if triton is not None:
    TAPS_C = tl.constexpr(TAPS)  # the constant inside the kernels

    @triton.jit
    def dwconv_layernorm_kernel(
        x_ptr, nbr_ptr, w_ptr, b_ptr, y_ptr, lnw_ptr, lnb_ptr, z_ptr, mean_ptr, rstd_ptr, M, C, eps,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """BLOCK_M whole rows per program: the conv block by block (y stored, its sum kept),
        then the centred squares and z from the stored y."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        at = rows.to(tl.int64)[:, None] * C
        nbr_rows = nbr_ptr + rows.to(tl.int64) * TAPS_C
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
            for k in range(TAPS_C):
                src = tl.load(nbr_rows + k, mask=row_ok, other=-1)
                present = src >= 0
                src = tl.where(present, src, 0).to(tl.int64)
                xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=present[:, None] & col_ok[None, :],
                             other=0.0)
                acc += xv.to(tl.float32) * tl.load(w_ptr + k * C + cols, mask=col_ok, other=0.0)[None, :]
            if HAS_BIAS:
                acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]
            y = acc.to(y_ptr.dtype.element_ty)
            tl.store(y_ptr + at + cols[None, :], y, mask=ok)
            total += tl.sum(tl.where(ok, y.to(tl.float32), 0.0), axis=1)
        tl.debug_barrier()  # y is read back below, possibly by other threads of this program
        mean = total / C
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            d = tl.where(ok, tl.load(y_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None], 0.0)
            squares += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(squares / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            yv = tl.load(y_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            z = (yv - mean[:, None]) * rstd[:, None] * tl.load(lnw_ptr + cols, mask=col_ok, other=0.0)[None, :] + \
                tl.load(lnb_ptr + cols, mask=col_ok, other=0.0)[None, :]
            tl.store(z_ptr + at + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


def triton_forward(x, nbr, w_taps, bias32, ln_w32, ln_b32, eps, dtype):
    m, c = x.shape
    y = torch.empty(m, c, dtype=dtype, device=x.device)
    z = torch.empty_like(y)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if m and c:
        dwconv_layernorm_kernel[(cdiv(m, BLOCK_M),)](
            x, nbr, w_taps, bias32 if bias32 is not None else w_taps, y, ln_w32, ln_b32, z, mean, rstd, m, c, eps,
            HAS_BIAS=bias32 is not None, BLOCK_M=BLOCK_M, BLOCK_C=block_c(c, FUSED_MAX_BLOCK_C),
        )
    return y, z, mean, rstd


# -- autograd -----------------------------------------------------------------------------

IMPLS = {"c": c_forward, "triton": triton_forward}


class RowsDwconvLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nbr, weight, bias, ln_weight, ln_bias, eps, impl):
        xk = dw.kernel_input(x, impl)
        ln_w32 = ln_weight.float().contiguous()
        bias32 = bias.float().contiguous() if bias is not None else None
        y, z, mean, rstd = IMPLS[impl](xk, nbr, dw.weight_by_tap(weight), bias32, ln_w32,
                                       ln_bias.float().contiguous(), eps, xk.dtype)
        ctx.save_for_backward(xk, nbr, weight, y, ln_w32, mean, rstd)
        ctx.impl = impl
        ctx.dtypes = (x.dtype, bias.dtype if bias is not None else None, ln_weight.dtype, ln_bias.dtype)
        return z.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        xk, nbr, weight, y, ln_w32, mean, rstd = ctx.saved_tensors
        x_dtype, b_dtype, lnw_dtype, lnb_dtype = ctx.dtypes
        _, ln_backward = ln.IMPLS[ctx.impl]
        dw_forward, dw_weight_grad = dw.IMPLS[ctx.impl]
        grad_y, grad_lnw, grad_lnb = ln_backward(y, ln_w32, mean, rstd, grad_z.to(xk.dtype).contiguous(), None, xk.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = dw_forward(grad_y, nbr, dw.weight_by_tap(weight, flip=True), None, xk.dtype).to(x_dtype)
        with_bias = b_dtype is not None and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[2] or with_bias:
            gw, gb = dw_weight_grad(xk, nbr, grad_y, with_bias)
            grad_w = gw.to(weight.dtype) if ctx.needs_input_grad[2] else None
            grad_b = gb.to(b_dtype) if with_bias else None
        return grad_x, None, grad_w, grad_b, grad_lnw.to(lnw_dtype), grad_lnb.to(lnb_dtype), None, None


def rows_dwconv_layernorm(x, nbr, weight, bias, ln_weight, ln_bias, eps: float, *,
                          impl: str | None = None, check_values: bool | None = None):
    """LayerNorm(depthwise 7x7(x)) on packed rows (M, C) -> (M, C) in the compute dtype.

    The conv's arguments and checks as rows_dwconv (nbr, weight (C, 49) or (C, 1, 7, 7),
    bias or None, check_values); ln_weight, ln_bias (C,); impl as there.
    """
    x, nbr, weight, bias = dw.check_dwconv(x, nbr, weight, bias, check_values)
    c = x.shape[1]
    check_vector(ln_weight, "ln_weight", c, x.device)
    check_vector(ln_bias, "ln_bias", c, x.device)
    impl = pick_impl(impl, x.device)
    ready_impl("rows_dwconv_layernorm", impl, x)
    if impl == "c" and not check_values:
        dw.check_neighbour_range(nbr)  # the C kernels read through it
    return RowsDwconvLayerNorm.apply(x.to(compute_dtype(x)), nbr, weight, bias, ln_weight, ln_bias, float(eps), impl)
