"""Residual epilogue on packed rows: `rows_residual(x, y, bias=None, scale=None, seg_offsets=None)`.

    out = x + (y + bias) * scale[n]      for the rows of sample n

It ends a ConvNeXt block after its last matmul: y = the bare matmul, bias = that Linear's
bias, scale (N,) = the per-sample drop-path factor (None: no drop path). Each step is
rounded to y's dtype as the separate ops would store it; the sum has the dtype of x + y. The
backward passes the gradient on to x unchanged (no copy), scales it for y, and sums it
for the bias. In this file: the reference, the C launchers (csrc/rows_residual.c), the
Triton kernels and launchers, the autograd function.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.common import check_offsets, check_rows, check_vector, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.triton_runtime import BLOCK_M, TARGET_PROGRAMS, block_c, cdiv, tl, triton

RESIDUAL_MAX_BLOCK_C = 128


def check_residual(x, y, bias, scale, seg_offsets, check_values):
    m, c = check_rows(x)
    if check_rows(y, "y") != (m, c):
        raise ValueError(f"y must have x's shape {(m, c)}, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; move them to one device")
    check_vector(bias, "bias", c, x.device, optional=True)
    if scale is not None:
        if seg_offsets is None:
            raise ValueError("a per-sample scale needs seg_offsets (N+1,) to know each sample's rows")
        check_offsets(seg_offsets, m, x.device, check_values)
        n = seg_offsets.numel() - 1
        if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (n,) or not scale.is_floating_point():
            raise ValueError(f"scale must be a float (N,) = ({n},) per-sample factor, got {tuple(getattr(scale, 'shape', ()))}")
        if scale.device != x.device:
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}; move them to one device")
    return (x.contiguous(), y.contiguous(), bias.contiguous() if bias is not None else None,
            scale.contiguous() if scale is not None else None, seg_offsets)


def rows_residual_reference(x, y, bias=None, scale=None, seg_offsets=None):
    """Plain torch, autograd for the backward."""
    x, y, bias, scale, seg_offsets = check_residual(x, y, bias, scale, seg_offsets, check_values=True)
    dtype = compute_dtype(y)
    with torch.autocast(x.device.type, enabled=False):
        r = y.to(dtype)
        if bias is not None:
            r = (r.float() + bias.float()).to(dtype)
        if scale is not None:
            rows_scale = torch.repeat_interleave(scale.float(), seg_offsets.diff())
            r = (r.float() * rows_scale[:, None]).to(dtype)
        return (x.float() + r.float()).to(torch.promote_types(x.dtype, dtype))


# -- C kernels (csrc/rows_residual.c) --------------------------------------------------------

_P, _I, _L = cpu_build.PTR, cpu_build.INT, cpu_build.LONG
C_FORWARD = ("rows_residual_forward", [_P, _I, _P, _I, _P, _P, _P, _L, _P, _I, _L, _L, _I])
C_BACKWARD = ("rows_residual_backward", [_P, _I, _P, _P, _L, _P, _I, _P, _L, _L, _I], _I)


def c_forward(x, y, bias32, scale32, offsets, out_dtype):
    m, c = x.shape
    out = torch.empty(m, c, dtype=out_dtype)
    if m and c:
        n = offsets.numel() - 1 if offsets is not None else 0
        cpu_build.function(*C_FORWARD)(
            cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(y), cpu_build.dtype_code(y), cpu_build.ptr(bias32),
            cpu_build.ptr(scale32), cpu_build.ptr(offsets), n, cpu_build.ptr(out), cpu_build.dtype_code(out), m, c,
            cpu_build.threads())
    return out


def c_backward(grad, scale32, offsets, with_bias: bool, y_dtype):
    """-> (grad y: grad itself when unscaled, else grad * scale in y_dtype; grad bias fp32 or None)."""
    m, c = grad.shape
    grad_y = torch.empty(m, c, dtype=y_dtype) if scale32 is not None else None
    if m == 0 or c == 0 or (grad_y is None and not with_bias):
        return (grad_y if grad_y is not None else grad), (torch.zeros(c) if with_bias else None)
    threads = cpu_build.threads()
    partial_b = torch.empty(threads, c) if with_bias else None
    n = offsets.numel() - 1 if offsets is not None else 0
    used = cpu_build.function(*C_BACKWARD)(
        cpu_build.ptr(grad), cpu_build.dtype_code(grad), cpu_build.ptr(scale32), cpu_build.ptr(offsets), n,
        cpu_build.ptr(grad_y), cpu_build.DTYPE_CODES[y_dtype], cpu_build.ptr(partial_b),
        m, c, threads)
    return (grad_y if grad_y is not None else grad), (partial_b[:used].sum(0) if with_bias else None)


# -- Triton kernels ------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def residual_forward_kernel(
        x_ptr, y_ptr, b_ptr, s_ptr, out_ptr, M, C,
        HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        row_ok = rows < M
        col_ok = cols < C
        ok = row_ok[:, None] & col_ok[None, :]
        at = rows.to(tl.int64)[:, None] * C + cols[None, :]
        r = tl.load(y_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            r = (r + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :]).to(y_ptr.dtype.element_ty).to(tl.float32)
        if HAS_SCALE:
            r = (r * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
        out = tl.load(x_ptr + at, mask=ok, other=0.0).to(tl.float32) + r
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def residual_backward_kernel(
        g_ptr, s_ptr, gy_ptr, gb_ptr, M, C, rows_per_chunk,
        HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """One chunk of rows per program: gy = g * scale[row] (stored when scaled), partial sum of gy
        per channel as stored in y's dtype."""
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, rows_per_chunk, BLOCK_M):
            rows = chunk * rows_per_chunk + offset + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows.to(tl.int64)[:, None] * C + cols[None, :]
            g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = g * tl.load(s_ptr + rows, mask=row_ok, other=0.0)[:, None]
            gy = g.to(gy_ptr.dtype.element_ty)
            if HAS_SCALE:
                tl.store(gy_ptr + at, gy, mask=ok)
            acc += tl.sum(gy.to(tl.float32), axis=0)
        if HAS_BIAS:
            tl.store(gb_ptr + chunk * C + cols, acc, mask=col_ok)


def _row_scale(scale32, offsets):
    """The per-sample factor repeated over each sample's rows (Triton reads it per row)."""
    return torch.repeat_interleave(scale32, offsets.diff(), output_size=None).contiguous()


def triton_forward(x, y, bias32, scale32, offsets, out_dtype):
    m, c = x.shape
    out = torch.empty(m, c, dtype=out_dtype, device=x.device)
    if m and c:
        rows_scale = _row_scale(scale32, offsets) if scale32 is not None else None
        bc = block_c(c, RESIDUAL_MAX_BLOCK_C)
        unused = torch.empty(1, dtype=torch.float32, device=x.device)  # absent fp32 arguments: one kernel variant
        residual_forward_kernel[(cdiv(m, BLOCK_M), cdiv(c, bc))](
            x, y, bias32 if bias32 is not None else unused, rows_scale if rows_scale is not None else unused, out, m, c,
            HAS_BIAS=bias32 is not None, HAS_SCALE=rows_scale is not None, BLOCK_M=BLOCK_M, BLOCK_C=bc,
        )
    return out


def triton_backward(grad, scale32, offsets, with_bias: bool, y_dtype):
    m, c = grad.shape
    if scale32 is None and not with_bias:
        return grad, None
    grad_y = torch.empty(m, c, dtype=y_dtype, device=grad.device) if scale32 is not None else None
    if m == 0 or c == 0:
        return (grad_y if grad_y is not None else grad), (torch.zeros(c, device=grad.device) if with_bias else None)
    bc = block_c(c, RESIDUAL_MAX_BLOCK_C)
    c_blocks = cdiv(c, bc)
    chunks = max(1, min(cdiv(TARGET_PROGRAMS, c_blocks), cdiv(m, BLOCK_M)))
    rows_per_chunk = cdiv(cdiv(m, chunks), BLOCK_M) * BLOCK_M
    chunks = cdiv(m, rows_per_chunk)
    partial_b = torch.empty(chunks, c, dtype=torch.float32, device=grad.device) if with_bias else None
    rows_scale = _row_scale(scale32, offsets) if scale32 is not None else None
    any_f32 = torch.empty(1, dtype=torch.float32, device=grad.device)  # absent fp32 arguments
    # unscaled, gy is not written, but its dtype is what the bias gradient sums (a 1-element stand-in)
    typed = grad_y if grad_y is not None else torch.empty(1, dtype=y_dtype, device=grad.device)
    residual_backward_kernel[(chunks, c_blocks)](
        grad, rows_scale if rows_scale is not None else any_f32, typed,
        partial_b if partial_b is not None else any_f32, m, c, rows_per_chunk,
        HAS_SCALE=rows_scale is not None, HAS_BIAS=with_bias, BLOCK_M=BLOCK_M, BLOCK_C=bc,
    )
    return (grad_y if grad_y is not None else grad), (partial_b.sum(0) if with_bias else None)


# -- autograd -----------------------------------------------------------------------------

IMPLS = {"c": (c_forward, c_backward), "triton": (triton_forward, triton_backward)}


class RowsResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, bias, scale, seg_offsets, out_dtype, impl):
        forward, _ = IMPLS[impl]
        kd = cpu_build.kernel_dtype if impl == "c" else (lambda d: d)
        xk, yk = x.to(kd(x.dtype)), y.to(kd(y.dtype))
        scale32 = scale.float().contiguous() if scale is not None else None
        ctx.save_for_backward(scale32, seg_offsets)
        ctx.impl, ctx.dtypes = impl, (x.dtype, y.dtype, bias.dtype if bias is not None else None)
        bias32 = bias.float().contiguous() if bias is not None else None
        return forward(xk, yk, bias32, scale32, seg_offsets, kd(out_dtype)).to(out_dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        scale32, seg_offsets = ctx.saved_tensors
        _, backward = IMPLS[ctx.impl]
        x_dtype, y_dtype, b_dtype = ctx.dtypes
        kd = cpu_build.kernel_dtype if ctx.impl == "c" else (lambda d: d)
        grad = grad_out.contiguous()
        grad = grad.to(kd(grad.dtype))
        with_bias = b_dtype is not None and ctx.needs_input_grad[2]
        grad_y, grad_b = backward(grad, scale32, seg_offsets, with_bias, kd(y_dtype))
        return (grad_out.to(x_dtype) if ctx.needs_input_grad[0] else None, grad_y.to(y_dtype),
                grad_b.to(b_dtype) if with_bias else None, None, None, None, None)


def rows_residual(x, y, bias=None, scale=None, seg_offsets=None, *, impl: str | None = None,
                  check_values: bool | None = None):
    """x + (y + bias) * scale[sample] on packed rows (M, C); see the module doc.

    The result has the dtype `x + y` would have (y taken in the compute dtype).
    scale (N,) needs seg_offsets (N+1,) int64 from 0 to M. impl: 'c' (CPU), 'triton'
    (CUDA, or CPU in Triton's interpreter), None = by device. check_values: validate the
    offsets (a device sync on CUDA); None = on CPU only; the C kernels always check them.
    """
    impl = pick_impl(impl, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    check = True if impl == "c" else check_values
    x, y, bias, scale, seg_offsets = check_residual(x, y, bias, scale, seg_offsets, check)
    ready_impl("rows_residual", impl, x)
    y = y.to(compute_dtype(y))
    return RowsResidual.apply(x, y, bias, scale, seg_offsets, torch.promote_types(x.dtype, y.dtype), impl)
