"""LayerNorm over the channels of packed rows: `rows_layernorm(x, weight, bias, eps, out_rows=None)`.

    z[out_rows[m]] = (x[m] - mean_m) / sqrt(var_m + eps) * weight + bias

out_rows (M,) int64, a permutation of the rows, writes each row where the next op wants
it (the native engine's downsample reads 2x2 windows as rows: with out_rows the window
reshape needs no copy); None = in place order.

Features are read in their dtype and z is written in the compute dtype (x's, or
autocast's), bfloat16 directly: under autocast a dense LayerNorm would return float32
and the following matmul would cast it back. Statistics in float32; weight and bias read
in float32. In this file: reference, C launchers (csrc/rows_layernorm.c), Triton kernels
and launchers, autograd function; `c_backward` / `triton_backward` also serve the fused
op of rows_dwconv_layernorm.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.common import check_rows, check_vector, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.triton_runtime import BLOCK_M, TARGET_PROGRAMS, block_c, cdiv, tl, triton

LN_MAX_BLOCK_C = 128


def check_layernorm(x, weight, bias, out_rows):
    m, c = check_rows(x)
    check_vector(weight, "weight", c, x.device)
    check_vector(bias, "bias", c, x.device)
    if out_rows is not None:
        if not isinstance(out_rows, torch.Tensor) or out_rows.dtype != torch.int64 or tuple(out_rows.shape) != (m,):
            raise ValueError(f"out_rows must be an int64 permutation of the {m} rows, shape ({m},), got "
                             f"{tuple(getattr(out_rows, 'shape', ()))} {getattr(out_rows, 'dtype', None)}")
        if out_rows.device != x.device:
            raise ValueError(f"out_rows is on {out_rows.device} but x is on {x.device}; move them to one device")
        out_rows = out_rows.contiguous()
    return x.contiguous(), weight.contiguous(), bias.contiguous(), out_rows


def check_row_range(out_rows: torch.Tensor) -> None:
    """Rows in [0, M): the cheap part of `check_permutation`; it keeps the C kernels' writes in
    bounds, so they run it always (once per version of the map, as rows_dwconv's range check)."""
    if getattr(out_rows, "_sparse_mae_range_checked", None) == out_rows._version:
        return
    m = out_rows.numel()
    if m and (int(out_rows.min()) < 0 or int(out_rows.max()) >= m):
        raise ValueError(f"out_rows values must be rows in [0, {m})")
    out_rows._sparse_mae_range_checked = out_rows._version


def check_permutation(out_rows: torch.Tensor) -> None:
    """Every row written exactly once (the kernels' writes stay in bounds and cover z)."""
    m = out_rows.numel()
    if m and not bool((torch.sort(out_rows).values == torch.arange(m, device=out_rows.device)).all()):
        raise ValueError(f"out_rows must be a permutation of 0..{m - 1}")


def rows_layernorm_reference(x, weight, bias, eps: float, out_rows=None):
    """Plain torch: F.layer_norm in float32, output in the compute dtype, rows moved by out_rows."""
    x, weight, bias, out_rows = check_layernorm(x, weight, bias, out_rows)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        z = F.layer_norm(x.to(dtype).float(), (x.shape[1],), weight.float(), bias.float(), eps).to(dtype)
    if out_rows is None:
        return z
    return torch.zeros_like(z).index_copy(0, out_rows, z)


# -- C kernels (csrc/rows_layernorm.c) -------------------------------------------------

_P, _I, _L, _F = cpu_build.PTR, cpu_build.INT, cpu_build.LONG, cpu_build.FLOAT
C_FORWARD = ("rows_layernorm_forward", [_P, _I, _P, _P, _F, _P, _I, _P, _P, _P, _L, _L, _I])
C_BACKWARD = ("rows_layernorm_backward", [_P, _I, _P, _P, _P, _P, _I, _P, _P, _I, _P, _P, _L, _L, _I], _I)


def c_forward(x, weight32, bias32, eps, out_rows, out_dtype):
    """-> z (M, C) out_dtype, mean (M,), rstd (M,)."""
    m, c = x.shape
    z = torch.empty(m, c, dtype=out_dtype)
    mean, rstd = torch.empty(m), torch.empty(m)
    if m and c:
        cpu_build.function(*C_FORWARD)(
            cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(weight32), cpu_build.ptr(bias32), eps,
            cpu_build.ptr(z), cpu_build.dtype_code(z), cpu_build.ptr(out_rows), cpu_build.ptr(mean),
            cpu_build.ptr(rstd), m, c, cpu_build.threads(),
        )
    return z, mean, rstd


def c_backward(x, weight32, mean, rstd, grad_z, out_rows, grad_dtype):
    """-> grad x (M, C) grad_dtype, grad weight (C,) fp32, grad bias (C,) fp32."""
    m, c = x.shape
    grad_x = torch.empty(m, c, dtype=grad_dtype)
    if m == 0 or c == 0:
        return grad_x, torch.zeros(c), torch.zeros(c)
    threads = cpu_build.threads()
    partial_w, partial_b = torch.empty(threads, c), torch.empty(threads, c)
    used = cpu_build.function(*C_BACKWARD)(
        cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(weight32), cpu_build.ptr(mean), cpu_build.ptr(rstd),
        cpu_build.ptr(grad_z), cpu_build.dtype_code(grad_z), cpu_build.ptr(out_rows), cpu_build.ptr(grad_x),
        cpu_build.dtype_code(grad_x), cpu_build.ptr(partial_w), cpu_build.ptr(partial_b), m, c, threads,
    )
    return grad_x, partial_w[:used].sum(0), partial_b[:used].sum(0)


# -- Triton kernels ------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def layernorm_forward_kernel(
        x_ptr, w_ptr, b_ptr, z_ptr, rows_ptr, mean_ptr, rstd_ptr, M, C, eps,
        HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """BLOCK_M rows per program, the channels in blocks: sum, then centred squares, then z."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        at = rows.to(tl.int64)[:, None] * C
        total = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            total += tl.sum(tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32), axis=1)
        mean = total / C
        squares = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            ok = row_ok[:, None] & (cols < C)[None, :]
            xv = tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            d = tl.where(ok, xv - mean[:, None], 0.0)
            squares += tl.sum(d * d, axis=1)
        rstd = 1.0 / tl.sqrt(squares / C + eps)
        if HAS_ROWS:
            dest = tl.load(rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * C
        else:
            dest = at
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            xv = tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
            z = (xv - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(z_ptr + dest + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=ok)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def layernorm_backward_kernel(
        x_ptr, w_ptr, mean_ptr, rstd_ptr, gz_ptr, rows_ptr, gx_ptr, M, C,
        HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """gx = rstd * (gz*w - mean_c(gz*w) - xh * mean_c(gz*w*xh)), BLOCK_M rows per program."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        at = rows.to(tl.int64)[:, None] * C
        if HAS_ROWS:
            src = tl.load(rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * C
        else:
            src = at
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            xh = (tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
            gw = tl.load(gz_ptr + src + cols[None, :], mask=ok, other=0.0).to(tl.float32) * \
                tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
            s1 += tl.sum(gw, axis=1)
            s2 += tl.sum(gw * xh, axis=1)
        c1 = s1 / C
        c2 = s2 / C
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_ok = cols < C
            ok = row_ok[:, None] & col_ok[None, :]
            xh = (tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
            gw = tl.load(gz_ptr + src + cols[None, :], mask=ok, other=0.0).to(tl.float32) * \
                tl.load(w_ptr + cols, mask=col_ok, other=0.0)[None, :]
            gx = rstd[:, None] * (gw - c1[:, None] - xh * c2[:, None])
            tl.store(gx_ptr + at + cols[None, :], gx.to(gx_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def layernorm_param_grad_kernel(
        x_ptr, mean_ptr, rstd_ptr, gz_ptr, rows_ptr, pw_ptr, pb_ptr, M, C, rows_per_chunk,
        HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Partial sums of gz * xh and gz over one chunk of rows (one slab per program, no atomics)."""
        chunk = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        acc_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, rows_per_chunk, BLOCK_M):
            rows = chunk * rows_per_chunk + offset + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            ok = row_ok[:, None] & col_ok[None, :]
            at = rows.to(tl.int64)[:, None] * C
            if HAS_ROWS:
                src = tl.load(rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)[:, None] * C
            else:
                src = at
            mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xh = (tl.load(x_ptr + at + cols[None, :], mask=ok, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None]
            g = tl.load(gz_ptr + src + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            acc_w += tl.sum(g * xh, axis=0)
            acc_b += tl.sum(g, axis=0)
        tl.store(pw_ptr + chunk * C + cols, acc_w, mask=col_ok)
        tl.store(pb_ptr + chunk * C + cols, acc_b, mask=col_ok)


def triton_forward(x, weight32, bias32, eps, out_rows, out_dtype):
    m, c = x.shape
    z = torch.empty(m, c, dtype=out_dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m and c:
        layernorm_forward_kernel[(cdiv(m, BLOCK_M),)](
            x, weight32, bias32, z, out_rows if out_rows is not None else mean, mean, rstd, m, c, eps,
            HAS_ROWS=out_rows is not None, BLOCK_M=BLOCK_M, BLOCK_C=block_c(c, LN_MAX_BLOCK_C),
        )
    return z, mean, rstd


def triton_backward(x, weight32, mean, rstd, grad_z, out_rows, grad_dtype):
    m, c = x.shape
    grad_x = torch.empty(m, c, dtype=grad_dtype, device=x.device)
    if m == 0 or c == 0:
        zeros = torch.zeros(c, dtype=torch.float32, device=x.device)
        return grad_x, zeros, zeros.clone()
    rows = out_rows if out_rows is not None else mean
    bc = block_c(c, LN_MAX_BLOCK_C)
    layernorm_backward_kernel[(cdiv(m, BLOCK_M),)](
        x, weight32, mean, rstd, grad_z, rows, grad_x, m, c,
        HAS_ROWS=out_rows is not None, BLOCK_M=BLOCK_M, BLOCK_C=bc,
    )
    c_blocks = cdiv(c, bc)
    chunks = max(1, min(cdiv(TARGET_PROGRAMS, c_blocks), cdiv(m, BLOCK_M)))
    rows_per_chunk = cdiv(cdiv(m, chunks), BLOCK_M) * BLOCK_M
    chunks = cdiv(m, rows_per_chunk)
    partial_w = torch.empty(chunks, c, dtype=torch.float32, device=x.device)
    partial_b = torch.empty_like(partial_w)
    layernorm_param_grad_kernel[(chunks, c_blocks)](
        x, mean, rstd, grad_z, rows, partial_w, partial_b, m, c, rows_per_chunk,
        HAS_ROWS=out_rows is not None, BLOCK_M=BLOCK_M, BLOCK_C=bc,
    )
    return grad_x, partial_w.sum(0), partial_b.sum(0)


# -- autograd -----------------------------------------------------------------------------

IMPLS = {"c": (c_forward, c_backward), "triton": (triton_forward, triton_backward)}


class RowsLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_rows, impl):
        forward, _ = IMPLS[impl]
        xk = x.to(cpu_build.kernel_dtype(x.dtype)) if impl == "c" else x
        w32 = weight.float().contiguous()
        z, mean, rstd = forward(xk, w32, bias.float().contiguous(), eps, out_rows, xk.dtype)
        ctx.save_for_backward(xk, w32, mean, rstd, out_rows)
        ctx.impl, ctx.dtypes = impl, (x.dtype, weight.dtype, bias.dtype)
        return z.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        xk, w32, mean, rstd, out_rows = ctx.saved_tensors
        _, backward = IMPLS[ctx.impl]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x, grad_w, grad_b = backward(xk, w32, mean, rstd, grad_z.to(xk.dtype).contiguous(), out_rows, xk.dtype)
        return grad_x.to(x_dtype), grad_w.to(w_dtype), grad_b.to(b_dtype), None, None, None


def rows_layernorm(x, weight, bias, eps: float, *, out_rows=None, impl: str | None = None,
                   check_values: bool | None = None):
    """LayerNorm over channels of packed rows (M, C) -> (M, C) in the compute dtype.

    out_rows: int64 permutation; row m of the result lands at out_rows[m] (None: in order).
    impl: 'c' (CPU), 'triton' (CUDA, or CPU in Triton's interpreter), None = by device.
    check_values: check that out_rows is a permutation; None = on CPU only (a device sync
    on CUDA). The engine, which builds the permutation itself, passes False.
    """
    x, weight, bias, out_rows = check_layernorm(x, weight, bias, out_rows)
    impl = pick_impl(impl, x.device)
    if out_rows is not None and (check_values or (check_values is None and x.device.type == "cpu")):
        check_permutation(out_rows)
    ready_impl("rows_layernorm", impl, x)
    if impl == "c" and out_rows is not None:
        check_row_range(out_rows)  # the C kernels write through it
    return RowsLayerNorm.apply(x.to(compute_dtype(x)), weight, bias, float(eps), out_rows, impl)
