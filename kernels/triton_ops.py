"""Triton ops of the native sparse engine on packed rows (M, C), with plain-torch references.

- `sparse_dwconv(x, nbr, weight, bias)`: submanifold depthwise 7x7. nbr (M, 49) int32
  holds the row of each site's neighbour at offset k = (dy+3)*7 + (dx+3) (ky-major, the
  order of a dense weight (C, 1, 7, 7).view(C, 49)), -1 where absent.
  out[m, c] = sum_k x[nbr[m, k], c] * weight[c, k] + bias[c].
- `segment_grn(x, seg_offsets, gamma, beta)`: GRN with the L2 norm per channel over the
  rows [seg_offsets[n], seg_offsets[n+1]) of each sample n.

Each has a `*_reference` in plain torch with the same semantics (fp32 accumulation,
output in x's dtype, bf16/fp16 inputs under autocast as below); the tests compare outputs
and every gradient against it. The depthwise conv's contract, neighbour map and reference
live in `dwconv_rows` (shared with the C kernels of `cpu_ops`) and are re-exported here.

Triton itself is imported on the first launch (see `triton_kernels`), so importing this
module is cheap and works without Triton. Kernels run compiled on CUDA; CPU tensors run
through Triton's interpreter only when TRITON_INTERPRET=1 was set before Triton was first
imported (tests; slow).

Autocast: `sparse_dwconv` runs in the autocast dtype like a dense conv (x, weight, bias
cast to it); `segment_grn` keeps x's dtype and always accumulates in fp32.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels.dwconv_rows import (  # noqa: F401  (re-exported: the op's contract)
    FLOAT_DTYPES,
    KERNEL,
    TAPS,
    _autocast_dtype,
    _check_dwconv,
    _check_neighbour_values,
    _check_rows,
    _dwconv_autocast,
    neighbour_map,
    sparse_dwconv_reference,
)

GRN_EPS = 1e-6

# Tile sizes. BLOCK_M rows x BLOCK_C channels per program, channels contiguous in memory.
DWCONV_BLOCK_M = 32
DWCONV_MAX_BLOCK_C = 64
SEGMENT_BLOCK_M = 32
SEGMENT_MAX_BLOCK_C = 128
TARGET_PROGRAMS = 1024  # enough to fill an H100 (132 SMs) several times over


# -- availability -----------------------------------------------------------------------


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _interpreter_active() -> bool:
    """TRITON_INTERPRET is on and Triton's own library was (or will be) imported under it."""
    if not _interpreter_requested():
        return False
    language = sys.modules.get("triton.language")
    if language is None:
        return True  # the first import will happen in interpreter mode
    # triton.language's own @jit helpers were built in the mode of that first import
    helper = getattr(getattr(language, "standard", None), "cdiv", None)
    return helper is None or type(helper).__name__ == "InterpretedFunction"


def triton_available(device: torch.device | str) -> bool:
    """True when these Triton ops can run on `device`.

    CUDA: Triton installed and a GPU of compute capability >= 7.0. CPU: Triton installed
    and its interpreter switched on (TRITON_INTERPRET=1 before Triton's first import).
    """
    if importlib.util.find_spec("triton") is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (7, 0)
    return device.type == "cpu" and _interpreter_active()


def _require_triton(device: torch.device) -> None:
    if triton_available(device):
        return
    if importlib.util.find_spec("triton") is None:
        why = "Triton is not installed (pip install triton)"
    elif device.type == "cpu":
        why = "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before Triton is first imported"
    else:
        why = f"no usable CUDA GPU for {device}"
    raise RuntimeError(f"Triton ops cannot run here: {why}. Use the *_reference functions instead.")


def _kernels():
    from sparse_mae_kernels import triton_kernels  # imports triton; see the module docstring

    return triton_kernels


def _block_c(c: int, limit: int) -> int:
    return max(16, min(limit, 1 << (c - 1).bit_length()))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# -- sparse depthwise 7x7 ---------------------------------------------------------------


def _dwconv_gather(x, nbr, weight, bias, out_dtype) -> torch.Tensor:
    """Launch the gather kernel: out = sum_k x[nbr[:, k]] * weight[:, k] (+ bias)."""
    m, c = x.shape
    out = torch.empty(m, c, dtype=out_dtype, device=x.device)
    if m == 0 or c == 0:
        return out
    block_c = _block_c(c, DWCONV_MAX_BLOCK_C)
    grid = (_cdiv(m, DWCONV_BLOCK_M), _cdiv(c, block_c))
    weight_by_tap = weight.t().contiguous()  # (49, C): contiguous channel loads per tap
    _kernels().dwconv_gather_kernel[grid](
        x, nbr, weight_by_tap, bias if bias is not None else weight_by_tap, out, m, c,
        HAS_BIAS=bias is not None, BLOCK_M=DWCONV_BLOCK_M, BLOCK_C=block_c,
    )
    return out


def _dwconv_param_grads(x, nbr, grad_out, with_bias: bool):
    """-> (grad_weight (C, 49) fp32, grad_bias (C,) fp32 or None), deterministic."""
    m, c = x.shape
    if m == 0:
        zeros = torch.zeros(c, TAPS, dtype=torch.float32, device=x.device)
        return zeros, (zeros[:, 0].clone() if with_bias else None)
    block_c = _block_c(c, DWCONV_MAX_BLOCK_C)
    c_blocks = _cdiv(c, block_c)
    # enough row chunks to fill the GPU, each a whole number of row blocks
    chunks = max(1, min(_cdiv(TARGET_PROGRAMS, c_blocks), _cdiv(m, DWCONV_BLOCK_M)))
    rows_per_chunk = _cdiv(_cdiv(m, chunks), DWCONV_BLOCK_M) * DWCONV_BLOCK_M
    chunks = _cdiv(m, rows_per_chunk)
    partial_w = torch.empty(chunks, TAPS, c, dtype=torch.float32, device=x.device)
    partial_b = torch.empty(chunks, c, dtype=torch.float32, device=x.device) if with_bias else partial_w
    _kernels().dwconv_weight_grad_kernel[(chunks, c_blocks)](
        x, nbr, grad_out, partial_w, partial_b, m, c, rows_per_chunk,
        HAS_BIAS=with_bias, BLOCK_M=DWCONV_BLOCK_M, BLOCK_C=block_c,
    )
    grad_w = partial_w.sum(0).t()
    return grad_w, (partial_b.sum(0) if with_bias else None)


class _SparseDwconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nbr, weight, bias):
        ctx.save_for_backward(x, nbr, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return _dwconv_gather(x, nbr, weight, bias, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, nbr, weight = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the adjoint of a submanifold conv is the same gather with the kernel flipped
            grad_x = _dwconv_gather(grad_out, nbr, weight.flip(1), None, x.dtype)
        with_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[2] or with_bias:
            gw, gb = _dwconv_param_grads(x, nbr, grad_out, with_bias)
            grad_w = gw.to(weight.dtype) if ctx.needs_input_grad[2] else None
            grad_b = gb.to(ctx.bias_dtype) if with_bias else None
        return grad_x, None, grad_w, grad_b


def sparse_dwconv(x, nbr, weight, bias=None, *, check_values: bool | None = None):
    """Submanifold depthwise 7x7 on packed rows with Triton: (M, C) -> (M, C) in x's dtype.

    nbr (M, 49) int32 neighbour rows (-1 = absent) must be symmetric (built from one set of
    sites). weight (C, 49) or (C, 1, 7, 7); bias (C,) or None. check_values: validate nbr's
    values (costs a device sync); default only for CPU tensors.
    """
    x, nbr, weight, bias = _check_dwconv(x, nbr, weight, bias, check_values)
    _require_triton(x.device)
    x, weight, bias = _dwconv_autocast(x, weight, bias)
    return _SparseDwconv.apply(x, nbr, weight, bias)


# -- GRN per segment --------------------------------------------------------------------


def _check_grn(x, seg_offsets, gamma, beta, check_values: bool | None):
    m, c = _check_rows(x)
    if seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError(f"seg_offsets must be (N+1,) with N >= 1 segments, got {tuple(seg_offsets.shape)}")
    if seg_offsets.dtype != torch.int64:
        raise ValueError(f"seg_offsets must be int64 (convert with .long()), got {seg_offsets.dtype}")
    for name, t in (("gamma", gamma), ("beta", beta)):
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must be (C,) = ({c},), got {tuple(t.shape)} (reshape with .view(-1))")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    for name, t in (("seg_offsets", seg_offsets), ("gamma", gamma), ("beta", beta)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if check_values or (check_values is None and x.device.type == "cpu"):
        if int(seg_offsets[0]) != 0 or int(seg_offsets[-1]) != m or bool((seg_offsets.diff() < 0).any()):
            raise ValueError(f"seg_offsets must rise from 0 to M = {m} (segment n is rows offsets[n]:offsets[n+1])")
    return x.contiguous(), seg_offsets.contiguous(), gamma.contiguous(), beta.contiguous()


def _segment_launch_shape(x: torch.Tensor, segments: int):
    m, c = x.shape
    block_c = _block_c(c, SEGMENT_MAX_BLOCK_C)
    # ~8 row blocks per program on average; more splits only where segments are long
    splits = max(1, min(64, _cdiv(m, segments * SEGMENT_BLOCK_M * 8)))
    return (segments, splits, _cdiv(c, block_c)), block_c


def _segment_sums(u, v, seg_offsets, with_sum: bool):
    """-> (sum of u*v, sum of u or None), each (N, C) fp32 per segment."""
    segments, c = seg_offsets.numel() - 1, u.shape[1]
    grid, block_c = _segment_launch_shape(u, segments)
    prod = torch.zeros(grid[1], segments, c, dtype=torch.float32, device=u.device)
    total = torch.zeros_like(prod) if with_sum else prod
    if u.numel() == 0:
        return prod.sum(0), (total.sum(0) if with_sum else None)
    _kernels().segment_sums_kernel[grid](
        u, v, seg_offsets, prod, total, segments, c,
        WITH_SUM=with_sum, BLOCK_M=SEGMENT_BLOCK_M, BLOCK_C=block_c,
    )
    return prod.sum(0), (total.sum(0) if with_sum else None)


def _segment_affine(u, p, v, q, r, seg_offsets, out_dtype):
    """out = u * p[seg] (+ v * q[seg]) (+ r), p and q (N, C) fp32."""
    segments = seg_offsets.numel() - 1
    out = torch.empty(u.shape, dtype=out_dtype, device=u.device)
    if u.numel() == 0:
        return out
    grid, block_c = _segment_launch_shape(u, segments)
    _kernels().segment_affine_kernel[grid](
        u, p, v if v is not None else u, q if q is not None else p, r if r is not None else p,
        seg_offsets, out, u.shape[1],
        HAS_V=v is not None, HAS_R=r is not None, BLOCK_M=SEGMENT_BLOCK_M, BLOCK_C=block_c,
    )
    return out


class _SegmentGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seg_offsets, gamma, beta):
        sumsq, _ = _segment_sums(x, x, seg_offsets, with_sum=False)
        gx = sumsq.sqrt()
        denom = gx.mean(dim=-1, keepdim=True) + GRN_EPS
        nx = gx / denom
        scale = 1.0 + gamma.float() * nx  # out = x * (1 + gamma * nx) + beta
        ctx.save_for_backward(x, seg_offsets, gx, denom, nx, gamma)
        ctx.beta_dtype = beta.dtype
        return _segment_affine(x, scale, None, None, beta, seg_offsets, x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, seg_offsets, gx, denom, nx, gamma = ctx.saved_tensors
        dy = grad_out.contiguous()
        g = gamma.float()
        # per segment: sum of dy * x (reaches gamma and nx) and of dy (reaches beta)
        dyx, dy_sum = _segment_sums(dy, x, seg_offsets, with_sum=True)
        grad_gamma = (dyx * nx).sum(0).to(gamma.dtype)
        grad_beta = dy_sum.sum(0).to(ctx.beta_dtype)
        d_nx = dyx * g
        # nx = gx / (mean_c gx + eps)
        d_gx = d_nx / denom - (d_nx * gx).sum(dim=-1, keepdim=True) / (x.shape[1] * denom * denom)
        # gx = ||x||_2 over the segment; 0 gradient where the norm is 0, as torch's norm
        coef = torch.where(gx > 0, d_gx / gx.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(gx))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _segment_affine(dy, 1.0 + g * nx, x, coef, None, seg_offsets, x.dtype)
        return grad_x, None, grad_gamma, grad_beta


def segment_grn(x, seg_offsets, gamma, beta, *, check_values: bool | None = None):
    """GRN per segment with Triton: x (M, C) rows of N samples -> (M, C) in x's dtype.

    gx[n, c] = ||x[rows of n, c]||_2, nx = gx / (mean_c gx + 1e-6),
    out = x + beta + gamma * x * nx[n]. seg_offsets (N+1,) int64 from 0 to M.
    check_values: validate the offsets (costs a device sync); default only for CPU tensors.
    """
    x, seg_offsets, gamma, beta = _check_grn(x, seg_offsets, gamma, beta, check_values)
    _require_triton(x.device)
    return _SegmentGRN.apply(x, seg_offsets, gamma, beta)


def segment_grn_reference(x, seg_offsets, gamma, beta):
    """Plain torch, autograd for the backward; fp32 inside, output in x's dtype."""
    x, seg_offsets, gamma, beta = _check_grn(x, seg_offsets, gamma, beta, check_values=True)
    xf = x.float()
    bounds = seg_offsets.tolist()
    gx = torch.stack([torch.linalg.vector_norm(xf[a:b], ord=2, dim=0) for a, b in zip(bounds[:-1], bounds[1:])])
    nx = gx / (gx.mean(dim=-1, keepdim=True) + GRN_EPS)
    segment_of_row = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=x.device), seg_offsets.diff())
    out = xf + beta.float() + gamma.float() * (xf * nx[segment_of_row])
    return out.to(x.dtype)
