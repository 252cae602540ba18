"""GRN per sample on patch tiles: `tiles_grn(x, patch_sample, num_samples, gamma, beta, eps)`.

x (P, T, C): T sites per visible patch, patches in sample-major order (patch_sample
sorted). The L2 norm of each channel runs over the visible sites of each sample only:

    gx[n, c] = ||x[patches of n, :, c]||_2,  nx = gx / (mean_c gx + eps),
    out = x + beta + gamma * x * nx[n]

Per-sample sums use segment_reduce on the contiguous runs of each sample (index_add_ was
measured ~1000x slower on CPU when other processes load the cores). Torch ops only: the
native engine's fallback on any device. Accumulates in float32, returns x's dtype. In
this file: the op (autograd function with a hand-written backward) and its reference.
"""
from __future__ import annotations

import torch


def _check_grn(x, patch_sample, gamma, beta):
    if x.dim() != 3:
        raise ValueError(f"GRN input must be (P, sites per patch, C), got {tuple(x.shape)}")
    if patch_sample.shape != (x.shape[0],):
        raise ValueError(f"patch_sample must be ({x.shape[0]},), got {tuple(patch_sample.shape)}")
    if gamma.shape != (x.shape[-1],) or beta.shape != (x.shape[-1],):
        raise ValueError(f"GRN gamma/beta must be ({x.shape[-1]},), got {tuple(gamma.shape)}, {tuple(beta.shape)}")


def tiles_grn_reference(x, patch_sample, num_samples, gamma, beta, eps: float):
    """Plain torch. x (P, T, C) tiles of T sites; patch_sample (P,) sample of each tile."""
    _check_grn(x, patch_sample, gamma, beta)
    sq = (x * x).sum(dim=1)
    gx = x.new_zeros(num_samples, x.shape[-1]).index_add(0, patch_sample, sq).sqrt()
    nx = gx / (gx.mean(dim=-1, keepdim=True) + eps)
    return x + beta + gamma * (x * nx[patch_sample].unsqueeze(1))


def _per_sample_sum(values: torch.Tensor, patch_counts: torch.Tensor) -> torch.Tensor:
    """(P, C) per-patch values -> (N, C) sums over each sample's contiguous run of patches."""
    return torch.segment_reduce(values, "sum", lengths=patch_counts, axis=0)


class TilesGRN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, patch_sample, patch_counts, gamma, beta, eps):
        xf = x.float()
        gx = _per_sample_sum((xf * xf).sum(dim=1), patch_counts).sqrt_()
        denom = gx.mean(dim=-1, keepdim=True) + eps
        nx = gx / denom
        g, b = gamma.float(), beta.float()
        scale = (1.0 + g * nx)[patch_sample].unsqueeze(1)  # y = x * (1 + gamma * nx) + beta
        y = torch.addcmul(b, xf, scale)
        ctx.save_for_backward(x, patch_sample, patch_counts, gx, denom, nx, gamma)
        ctx.dtypes = (x.dtype, gamma.dtype, beta.dtype)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, patch_sample, patch_counts, gx, denom, nx, gamma = ctx.saved_tensors
        x_dtype, g_dtype, b_dtype = ctx.dtypes
        dy, xf, g = grad_out.float(), x.float(), gamma.float()
        c = x.shape[-1]
        # per-sample sum over sites of dy * x: the gradient reaching nx (times gamma)
        dyx = _per_sample_sum((dy * xf).sum(dim=1), patch_counts)
        grad_gamma = (dyx * nx).sum(dim=0)
        grad_beta = dy.sum(dim=(0, 1))
        d_nx = dyx * g
        # nx = gx / (mean_c gx + eps)
        d_gx = d_nx / denom - (d_nx * gx).sum(dim=-1, keepdim=True) / (c * denom * denom)
        # gx = ||x||_2 over the sample's sites; 0 gradient where the norm is 0 (as torch)
        coef = torch.where(gx > 0, d_gx / gx.clamp_min(torch.finfo(gx.dtype).tiny), torch.zeros_like(gx))
        grad_x = dy * (1.0 + g * nx)[patch_sample].unsqueeze(1) + xf * coef[patch_sample].unsqueeze(1)
        return grad_x.to(x_dtype), None, None, grad_gamma.to(g_dtype), grad_beta.to(b_dtype), None


def tiles_grn(x, patch_sample, num_samples: int, gamma, beta, eps: float):
    """GRN with the norm over each sample's visible sites. x (P, T, C) -> same.

    patch_sample must be sorted (sample-major tiles), as the native layout packs them.
    """
    _check_grn(x, patch_sample, gamma, beta)
    if patch_sample.numel() > 1 and bool((patch_sample[1:] < patch_sample[:-1]).any()):
        raise ValueError("tiles_grn needs tiles in sample-major order (patch_sample sorted)")
    patch_counts = torch.bincount(patch_sample, minlength=num_samples)
    return TilesGRN.apply(x, patch_sample, patch_counts, gamma, beta, float(eps))
