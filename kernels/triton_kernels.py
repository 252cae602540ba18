"""The Triton kernels behind `triton_ops` (launchers, autograd and references live there).

Imported lazily by `triton_ops` on the first launch, not at package import: whether
Triton runs compiled (CUDA) or in its CPU interpreter is fixed when `triton.language` is
first imported (env TRITON_INTERPRET), so importing Triton early would pin the mode.

Layouts: features are packed rows (M, C), C contiguous; 49 = the 7x7 depthwise taps,
k = (dy+3)*7 + (dx+3). Every kernel accumulates in fp32 and stores in its output's dtype.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dwconv_gather_kernel(
    x_ptr,  # (M, C) features
    nbr_ptr,  # (M, 49) int32 neighbour rows, -1 = absent
    w_ptr,  # (49, C) weight, transposed so each tap's channels are contiguous
    b_ptr,  # (C,) bias (ignored unless HAS_BIAS)
    out_ptr,  # (M, C)
    M,
    C,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[m, c] = sum_k x[nbr[m, k], c] * w[k, c] (+ b[c]); one (BLOCK_M, BLOCK_C) tile each."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < M
    col_ok = cols < C
    nbr_rows = nbr_ptr + rows.to(tl.int64) * 49
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    for k in range(49):
        src = tl.load(nbr_rows + k, mask=row_ok, other=-1)
        present = src >= 0
        src = tl.where(present, src, 0).to(tl.int64)  # keep masked-off addresses in bounds
        xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=present[:, None] & col_ok[None, :], other=0.0)
        wv = tl.load(w_ptr + k * C + cols, mask=col_ok, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def dwconv_weight_grad_kernel(
    x_ptr,  # (M, C) forward input
    nbr_ptr,  # (M, 49) int32
    g_ptr,  # (M, C) gradient of the output
    gw_ptr,  # (chunks, 49, C) fp32 partial weight gradients, one slab per row chunk
    gb_ptr,  # (chunks, C) fp32 partial bias gradients (ignored unless HAS_BIAS)
    M,
    C,
    rows_per_chunk,  # a multiple of BLOCK_M
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Partial sums over one chunk of rows: gw[k, c] = sum_m x[nbr[m, k], c] * g[m, c].

    Each program owns its slab, so no atomics: the result is deterministic, and the few
    slabs are summed by the launcher.
    """
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    first = chunk * rows_per_chunk
    for k in range(49):
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, rows_per_chunk, BLOCK_M):
            rows = first + offset + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            src = tl.load(nbr_ptr + rows64 * 49 + k, mask=row_ok, other=-1)
            present = src >= 0
            src = tl.where(present, src, 0).to(tl.int64)
            xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=present[:, None] & col_ok[None, :], other=0.0)
            gv = tl.load(g_ptr + rows64[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += tl.sum(xv.to(tl.float32) * gv.to(tl.float32), axis=0)
        tl.store(gw_ptr + (chunk * 49 + k) * C + cols, acc, mask=col_ok)
    if HAS_BIAS:
        acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for offset in range(0, rows_per_chunk, BLOCK_M):
            rows = first + offset + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            gv = tl.load(
                g_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.sum(gv.to(tl.float32), axis=0)
        tl.store(gb_ptr + chunk * C + cols, acc, mask=col_ok)


@triton.jit
def segment_sums_kernel(
    u_ptr,  # (M, C)
    v_ptr,  # (M, C)
    offsets_ptr,  # (N+1,) int64 first row of each segment
    prod_ptr,  # (splits, N, C) fp32: sum over the segment's rows of u * v
    sum_ptr,  # (splits, N, C) fp32: sum of u (ignored unless WITH_SUM)
    N,
    C,
    WITH_SUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Per-segment, per-channel sums; program (n, split, c-block) takes every splits-th row block.

    Interleaving the row blocks over `splits` programs spreads a long segment over the GPU
    without the host knowing the segment lengths (no device sync).
    """
    n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = tl.load(offsets_ptr + n)
    end = tl.load(offsets_ptr + n + 1)
    acc_prod = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_sum = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for block_start in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        at = rows.to(tl.int64)[:, None] * C + cols[None, :]
        uv = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32)
        vv = tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32)
        acc_prod += tl.sum(uv * vv, axis=0)
        if WITH_SUM:
            acc_sum += tl.sum(uv, axis=0)
    slot = (split * N + n).to(tl.int64) * C + cols
    tl.store(prod_ptr + slot, acc_prod, mask=col_ok)
    if WITH_SUM:
        tl.store(sum_ptr + slot, acc_sum, mask=col_ok)


@triton.jit
def segment_affine_kernel(
    u_ptr,  # (M, C)
    p_ptr,  # (N, C) fp32 per-segment scale of u
    v_ptr,  # (M, C) (ignored unless HAS_V)
    q_ptr,  # (N, C) fp32 per-segment scale of v (ignored unless HAS_V)
    r_ptr,  # (C,) shift (ignored unless HAS_R)
    offsets_ptr,  # (N+1,) int64
    out_ptr,  # (M, C)
    C,
    HAS_V: tl.constexpr,
    HAS_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[m, c] = u[m, c] * p[n, c] (+ v[m, c] * q[n, c]) (+ r[c]) for the rows m of segment n."""
    n = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    start = tl.load(offsets_ptr + n)
    end = tl.load(offsets_ptr + n + 1)
    seg = n.to(tl.int64) * C + cols
    p = tl.load(p_ptr + seg, mask=col_ok, other=0.0)
    if HAS_V:
        q = tl.load(q_ptr + seg, mask=col_ok, other=0.0)
    if HAS_R:
        r = tl.load(r_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for block_start in range(start + split * BLOCK_M, end, num_splits * BLOCK_M):
        rows = block_start + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        at = rows.to(tl.int64)[:, None] * C + cols[None, :]
        out = tl.load(u_ptr + at, mask=ok, other=0.0).to(tl.float32) * p[None, :]
        if HAS_V:
            out += tl.load(v_ptr + at, mask=ok, other=0.0).to(tl.float32) * q[None, :]
        if HAS_R:
            out += r[None, :]
        tl.store(out_ptr + at, out.to(out_ptr.dtype.element_ty), mask=ok)
