"""GRN per sample on packed rows, with an optional bias + GELU prologue:
`rows_grn(x, seg_offsets, gamma, beta, input_bias=None, gelu=False)`.

Rows of sample n are [seg_offsets[n], seg_offsets[n+1]). The GRN input is
v = gelu(x + input_bias) with the prologue (the first Linear's bias and the activation of
a ConvNeXt block, so that Linear runs as a bare matmul), else v = x; each step rounded to
the compute dtype as the separate ops would store it. Then

    gx[n, c] = ||v[rows of n, c]||_2,   nx = gx / (mean_c gx + eps),
    out = v + beta + gamma * v * nx[n]            (computed as v * (1 + gamma * nx) + beta)

Kernels: stats (sum of v^2 per sample; v stored when there is a prologue), apply,
backward sums (of dy * v and dy), backward input (with the GELU derivative and the input
bias gradient, recomputing the GELU). The (N, C) maths between them is torch. In this file: the
reference, the C launchers (csrc/rows_grn.c), the Triton kernels and launchers, the
autograd function. Features in the compute dtype, float32 inside, parameters float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.common import check_offsets, check_rows, check_vector, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.triton_runtime import block_c, cdiv, tl, triton

SEGMENT_BLOCK_M = 32
SEGMENT_MAX_BLOCK_C = 128


def check_grn(x, seg_offsets, gamma, beta, input_bias, check_values):
    m, c = check_rows(x)
    check_offsets(seg_offsets, m, x.device, check_values)
    check_vector(gamma, "gamma", c, x.device)
    check_vector(beta, "beta", c, x.device)
    check_vector(input_bias, "input_bias", c, x.device, optional=True)
    return (x.contiguous(), seg_offsets.contiguous(), gamma.contiguous(), beta.contiguous(),
            input_bias.contiguous() if input_bias is not None else None)


def rows_grn_reference(x, seg_offsets, gamma, beta, input_bias=None, gelu: bool = False, *, eps: float):
    """Plain torch, autograd for the backward; float32 inside, output in the compute dtype."""
    x, seg_offsets, gamma, beta, input_bias = check_grn(x, seg_offsets, gamma, beta, input_bias, check_values=True)
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        v = x.to(dtype)
        if input_bias is not None:
            v = (v.float() + input_bias.float()).to(dtype)
        if gelu:
            v = F.gelu(v.float()).to(dtype)
        vf = v.float()
        bounds = seg_offsets.tolist()
        gx = torch.stack([torch.linalg.vector_norm(vf[a:b], ord=2, dim=0) for a, b in zip(bounds[:-1], bounds[1:])])
        nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
        segment_of_row = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=x.device), seg_offsets.diff())
        out = vf + beta.float() + gamma.float() * (vf * nx[segment_of_row])
        return out.to(dtype)


# -- C kernels (csrc/rows_grn.c) ----------------------------------------------------------

_P, _I, _L = cpu_build.PTR, cpu_build.INT, cpu_build.LONG
C_STATS = ("rows_grn_stats", [_P, _I, _P, _I, _P, _I, _P, _L, _P, _L, _L, _I], _I)
C_APPLY = ("rows_grn_apply", [_P, _I, _P, _L, _P, _P, _P, _I, _L, _L, _I])
C_BACKWARD_SUMS = ("rows_grn_backward_sums", [_P, _I, _P, _I, _P, _L, _P, _P, _L, _L, _I], _I)
C_BACKWARD_INPUT = ("rows_grn_backward_input", [_P, _I, _P, _I, _P, _I, _P, _L, _P, _P, _P, _I, _P, _L, _L, _I], _I)


def c_stats(x, bias, gelu, offsets):
    """-> ((N, C) fp32 sum of v^2 per segment, v (M, C): stored with a prologue, else x)."""
    (m, c), n = x.shape, offsets.numel() - 1
    v = torch.empty_like(x) if (bias is not None or gelu) else x
    if m == 0 or c == 0:
        return torch.zeros(n, c), v
    threads = cpu_build.threads()
    partial = torch.empty(threads, n, c)
    used = cpu_build.function(*C_STATS)(
        cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(bias), int(gelu), cpu_build.ptr(v),
        cpu_build.dtype_code(v), cpu_build.ptr(offsets), n, cpu_build.ptr(partial), m, c, threads)
    return partial[:used].sum(0), v


def c_apply(v, offsets, scale, beta32, out_dtype):
    (m, c), n = v.shape, offsets.numel() - 1
    out = torch.empty(m, c, dtype=out_dtype)
    if m and c:
        cpu_build.function(*C_APPLY)(cpu_build.ptr(v), cpu_build.dtype_code(v), cpu_build.ptr(offsets), n,
                                     cpu_build.ptr(scale), cpu_build.ptr(beta32), cpu_build.ptr(out),
                                     cpu_build.dtype_code(out), m, c, cpu_build.threads())
    return out


def c_backward_sums(v, grad, offsets):
    """-> (sum of grad * v per segment (N, C), sum of grad (C,)), fp32."""
    (m, c), n = v.shape, offsets.numel() - 1
    if m == 0 or c == 0:
        return torch.zeros(n, c), torch.zeros(c)
    threads = cpu_build.threads()
    partial_dyx, partial_dy = torch.empty(threads, n, c), torch.empty(threads, c)
    used = cpu_build.function(*C_BACKWARD_SUMS)(
        cpu_build.ptr(v), cpu_build.dtype_code(v), cpu_build.ptr(grad), cpu_build.dtype_code(grad),
        cpu_build.ptr(offsets), n, cpu_build.ptr(partial_dyx), cpu_build.ptr(partial_dy), m, c, threads)
    return partial_dyx[:used].sum(0), partial_dy[:used].sum(0)


def c_backward_input(x, bias, gelu, grad, offsets, scale, coef, out_dtype):
    """-> (grad x (M, C) out_dtype, grad input_bias (C,) fp32 or None)."""
    (m, c), n = x.shape, offsets.numel() - 1
    grad_x = torch.empty(m, c, dtype=out_dtype)
    if m == 0 or c == 0:
        return grad_x, (torch.zeros(c) if bias is not None else None)
    threads = cpu_build.threads()
    partial_b = torch.empty(threads, c) if bias is not None else None
    used = cpu_build.function(*C_BACKWARD_INPUT)(
        cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(bias), int(gelu), cpu_build.ptr(grad),
        cpu_build.dtype_code(grad), cpu_build.ptr(offsets), n, cpu_build.ptr(scale), cpu_build.ptr(coef),
        cpu_build.ptr(grad_x), cpu_build.dtype_code(grad_x), cpu_build.ptr(partial_b), m, c, threads)
    return grad_x, (partial_b[:used].sum(0) if bias is not None else None)


# -- Triton kernels ------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def grn_input(h_ptr, b_ptr, at, cols, ok, col_ok, HAS_BIAS: tl.constexpr, GELU: tl.constexpr):
        """-> (v, pre-activation), each rounded to h's dtype like a stored intermediate; 0 where masked
        (the bias would otherwise turn padding rows into values that the sums pick up)."""
        pre = tl.load(h_ptr + at, mask=ok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            pre = (pre + tl.load(b_ptr + cols, mask=col_ok, other=0.0)[None, :])
            pre = pre.to(h_ptr.dtype.element_ty).to(tl.float32)
        v = pre
        if GELU:
            v = 0.5 * pre * (1.0 + tl.erf(pre * 0.7071067811865476))
            v = v.to(h_ptr.dtype.element_ty).to(tl.float32)
        return tl.where(ok, v, 0.0), tl.where(ok, pre, 0.0)

    @triton.jit
    def grn_rows_kernel(
        h_ptr, b_ptr, g_ptr, offsets_ptr, p_ptr, q_ptr, beta_ptr, out_ptr, s1_ptr, s2_ptr, N, C,
        MODE: tl.constexpr,  # 0 stats, 1 apply, 2 backward sums, 3 backward input
        HAS_BIAS: tl.constexpr, GELU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Program (segment n, split, channel block) takes every splits-th row block of n.

        stats:          s1[split, n] = sum v^2; out = v (stored when there is a prologue)
        apply:          out = v * p[n] + beta           (h is v: no prologue)
        backward sums:  s1[split, n] = sum g * v,  s2[split, n] = sum g     (h is v)
        backward input: out = (g * p[n] + v * q[n]) (* gelu'(pre)),  s2[split, n] = sum out
        Interleaving the row blocks over `splits` programs spreads a long segment over the
        GPU without the host knowing the segment lengths (no device sync).
        """
        n = tl.program_id(0)
        split = tl.program_id(1)
        num_splits = tl.num_programs(1)
        cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        start = tl.load(offsets_ptr + n)
        end = tl.load(offsets_ptr + n + 1)
        seg = n.to(tl.int64) * C + cols
        if MODE == 1 or MODE == 3:
            p = tl.load(p_ptr + seg, mask=col_ok, other=0.0)
        if MODE == 1:
            beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
        if MODE == 3:
            q = tl.load(q_ptr + seg, mask=col_ok, other=0.0)
        acc1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for block_start in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
            rows = block_start + tl.arange(0, BLOCK_M)
            ok = (rows < end)[:, None] & col_ok[None, :]
            at = rows.to(tl.int64)[:, None] * C + cols[None, :]
            v, pre = grn_input(h_ptr, b_ptr, at, cols, ok, col_ok, HAS_BIAS, GELU)
            if MODE == 0:
                acc1 += tl.sum(v * v, axis=0)
                if HAS_BIAS or GELU:
                    tl.store(out_ptr + at, v.to(out_ptr.dtype.element_ty), mask=ok)
            if MODE == 1:
                tl.store(out_ptr + at, (v * p[None, :] + beta[None, :]).to(out_ptr.dtype.element_ty), mask=ok)
            if MODE == 2:
                g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
                acc1 += tl.sum(g * v, axis=0)
                acc2 += tl.sum(g, axis=0)
            if MODE == 3:
                g = tl.load(g_ptr + at, mask=ok, other=0.0).to(tl.float32)
                gv = g * p[None, :] + v * q[None, :]
                if GELU:  # the GELU backward reads a stored gradient
                    gv = gv.to(out_ptr.dtype.element_ty).to(tl.float32)
                    cdf = 0.5 * (1.0 + tl.erf(pre * 0.7071067811865476))
                    gv = gv * (cdf + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre))
                stored = gv.to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + at, stored, mask=ok)
                acc2 += tl.sum(tl.where(ok, stored.to(tl.float32), 0.0), axis=0)
        slot = (split * N + n).to(tl.int64) * C + cols
        if MODE == 0 or MODE == 2:
            tl.store(s1_ptr + slot, acc1, mask=col_ok)
        if MODE == 2 or MODE == 3:
            tl.store(s2_ptr + slot, acc2, mask=col_ok)


def _triton_launch(mode, x, bias, gelu, offsets, grad=None, p=None, q=None, beta=None, out_dtype=None):
    """-> (out or None, s1 (N, C) or None, s2 (N, C) or None); s1, s2 summed over splits."""
    (m, c), n = x.shape, offsets.numel() - 1
    bc = block_c(c, SEGMENT_MAX_BLOCK_C)
    # ~8 row blocks per program on average; more splits only where segments are long
    splits = max(1, min(64, cdiv(m, n * SEGMENT_BLOCK_M * 8)))
    s1 = torch.zeros(splits, n, c, dtype=torch.float32, device=x.device) if mode in (0, 2) else None
    s2 = torch.zeros(splits, n, c, dtype=torch.float32, device=x.device) if mode in (2, 3) else None
    prologue = bias is not None or gelu
    out = torch.empty(m, c, dtype=out_dtype, device=x.device) if mode in (1, 3) or (mode == 0 and prologue) else None
    if m and c:
        any_f32 = s1 if s1 is not None else s2 if s2 is not None else p
        grn_rows_kernel[(n, splits, cdiv(c, bc))](
            x, bias if bias is not None else any_f32, grad if grad is not None else x, offsets,
            p if p is not None else any_f32, q if q is not None else any_f32, beta if beta is not None else any_f32,
            out if out is not None else x, s1 if s1 is not None else any_f32, s2 if s2 is not None else any_f32,
            n, c, MODE=mode, HAS_BIAS=bias is not None, GELU=bool(gelu), BLOCK_M=SEGMENT_BLOCK_M, BLOCK_C=bc,
        )
    return out, (s1.sum(0) if s1 is not None else None), (s2.sum(0) if s2 is not None else None)


def triton_stats(x, bias, gelu, offsets):
    v, sq, _ = _triton_launch(0, x, bias, gelu, offsets, out_dtype=x.dtype)
    return sq, (v if v is not None else x)


def triton_apply(v, offsets, scale, beta32, out_dtype):
    return _triton_launch(1, v, None, False, offsets, p=scale, beta=beta32, out_dtype=out_dtype)[0]


def triton_backward_sums(v, grad, offsets):
    _, dyx, dy = _triton_launch(2, v, None, False, offsets, grad=grad)
    return dyx, dy.sum(0)


def triton_backward_input(x, bias, gelu, grad, offsets, scale, coef, out_dtype):
    grad_x, _, sums = _triton_launch(3, x, bias, gelu, offsets, grad=grad, p=scale, q=coef, out_dtype=out_dtype)
    return grad_x, (sums.sum(0) if bias is not None else None)


# -- autograd -----------------------------------------------------------------------------

IMPLS = {
    "c": (c_stats, c_apply, c_backward_sums, c_backward_input),
    "triton": (triton_stats, triton_apply, triton_backward_sums, triton_backward_input),
}


class RowsGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seg_offsets, gamma, beta, input_bias, gelu, eps, impl):
        stats, apply, _, _ = IMPLS[impl]
        xk = x.to(cpu_build.kernel_dtype(x.dtype)) if impl == "c" else x
        bias32 = input_bias.float().contiguous() if input_bias is not None else None
        sumsq, v = stats(xk, bias32, gelu, seg_offsets)
        gx = sumsq.sqrt_()
        denom = gx.mean(dim=-1, keepdim=True) + eps
        nx = gx / denom
        g32 = gamma.float()
        scale = (1.0 + g32 * nx).contiguous()  # out = v * (1 + gamma * nx) + beta
        ctx.save_for_backward(xk, v, seg_offsets, bias32, gx, denom, nx, g32, scale)
        ctx.impl, ctx.gelu = impl, gelu
        ctx.dtypes = (x.dtype, gamma.dtype, beta.dtype, input_bias.dtype if input_bias is not None else None)
        return apply(v, seg_offsets, scale, beta.float().contiguous(), xk.dtype).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xk, v, seg_offsets, bias32, gx, denom, nx, g32, scale = ctx.saved_tensors
        _, _, backward_sums, backward_input = IMPLS[ctx.impl]
        x_dtype, g_dtype, b_dtype, ib_dtype = ctx.dtypes
        grad = grad_out.to(xk.dtype).contiguous()
        # per sample: sum of dy * v (reaches gamma and nx) and of dy (reaches beta)
        dyx, dy_sum = backward_sums(v, grad, seg_offsets)
        grad_gamma = (dyx * nx).sum(0).to(g_dtype)
        grad_beta = dy_sum.to(b_dtype)
        grad_x = grad_ib = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[4]:
            d_nx = dyx * g32
            # nx = gx / (mean_c gx + eps)
            d_gx = d_nx / denom - (d_nx * gx).sum(dim=-1, keepdim=True) / (gx.shape[1] * denom * denom)
            # gx = ||v||_2 over the sample's rows; 0 gradient where the norm is 0, as torch's norm
            coef = torch.where(gx > 0, d_gx / gx.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(gx))
            gx_rows, gb = backward_input(xk, bias32, ctx.gelu, grad, seg_offsets, scale, coef.contiguous(), xk.dtype)
            grad_x = gx_rows.to(x_dtype)
            grad_ib = gb.to(ib_dtype) if ib_dtype is not None else None
        return grad_x, None, grad_gamma, grad_beta, grad_ib, None, None, None


def rows_grn(x, seg_offsets, gamma, beta, input_bias=None, gelu: bool = False, *, eps: float,
             impl: str | None = None, check_values: bool | None = None):
    """GRN per segment of packed rows (M, C) -> (M, C) in the compute dtype; see the module doc.

    seg_offsets (N+1,) int64 from 0 to M; gamma, beta, input_bias (C,). impl: 'c' (CPU),
    'triton' (CUDA, or CPU in Triton's interpreter), None = by device. check_values:
    validate the offsets (a device sync on CUDA); None = on CPU only. The C kernels check
    the offsets always (they keep their reads in bounds).
    """
    impl = pick_impl(impl, x.device if isinstance(x, torch.Tensor) else torch.device("cpu"))
    check = True if impl == "c" else check_values
    x, seg_offsets, gamma, beta, input_bias = check_grn(x, seg_offsets, gamma, beta, input_bias, check)
    ready_impl("rows_grn", impl, x)
    return RowsGRN.apply(x.to(compute_dtype(x)), seg_offsets, gamma, beta, input_bias, bool(gelu), float(eps), impl)
