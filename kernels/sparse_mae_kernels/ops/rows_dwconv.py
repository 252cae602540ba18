"""Submanifold depthwise 7x7 on packed rows: `rows_dwconv(x, nbr, weight, bias)`.

Sites are packed rows x (M, C); nbr (M, 49) int32 holds the row of each site's
neighbour at tap k = (dy+3)*7 + (dx+3) (ky-major, the order of a dense weight
(C, 1, 7, 7).view(C, 49)), -1 where absent; the map is symmetric (built from one set of
sites), which makes the input gradient the same op with the taps flipped.

    y[m, c] = sum_k x[nbr[m, k], c] * weight[c, k] + bias[c]

In this file: the checks, `neighbour_map`, the plain-torch reference
`rows_dwconv_reference`, the C kernels' launchers (csrc/rows_dwconv.c), the Triton
kernels and launchers, and the autograd function. Features are read and written in
their dtype (float32 or bfloat16 directly; float16 through float32 in C), accumulated in
float32; weight and bias are read in float32. Under autocast x is first cast to the
autocast dtype, as a dense conv's input would be.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.common import check_rows, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.constants import HALO, KERNEL_SIZE, TAPS
from sparse_mae_kernels.triton_runtime import BLOCK_M, TARGET_PROGRAMS, block_c, cdiv, tl, triton

DWCONV_MAX_BLOCK_C = 64

# -- contract ---------------------------------------------------------------------------


def check_neighbour_range(nbr: torch.Tensor) -> None:
    """Rows in [-1, M): the cheap part of `check_neighbour_values`; it keeps the C kernels'
    reads in bounds, so they run it always. A map is checked once per version: the engine
    passes one map to every block of a stage, and an in-place write bumps the version."""
    if getattr(nbr, "_sparse_mae_range_checked", None) == nbr._version:
        return
    m = nbr.shape[0]
    if m and (int(nbr.min()) < -1 or int(nbr.max()) >= m):
        raise ValueError(f"nbr values must be rows in [0, {m}) or -1 for an absent neighbour")
    nbr._sparse_mae_range_checked = nbr._version


def check_neighbour_values(nbr: torch.Tensor) -> None:
    """Rows in [-1, M), and the map symmetric: n = nbr[m, k] iff m = nbr[n, 48 - k].

    Symmetry (output sites = input sites) is what lets the input gradient be the same
    gather with the flipped kernel. Costs a device sync, hence only on request on CUDA.
    """
    check_neighbour_range(nbr)
    m = nbr.shape[0]
    if m == 0:
        return
    rows = torch.arange(m, device=nbr.device).unsqueeze(1).expand(m, TAPS)
    taps = torch.arange(TAPS, device=nbr.device).expand(m, TAPS)
    present = nbr >= 0
    back = nbr.long()[present], (TAPS - 1) - taps[present]
    if not bool((nbr[back] == rows[present]).all()):
        raise ValueError(
            "nbr is not a submanifold neighbour map: site n is m's neighbour at offset k but m "
            "is not n's neighbour at offset 48-k (build it from one set of site coordinates, "
            "e.g. with neighbour_map())"
        )


def check_dwconv(x, nbr, weight, bias, check_values: bool | None):
    """Validate and normalise -> (x, nbr, weight (C, 49), bias) contiguous.

    check_values: also check nbr's values (range and symmetry); None = on CPU only (on
    CUDA it costs a device sync)."""
    m, c = check_rows(x)
    if not isinstance(nbr, torch.Tensor) or nbr.dim() != 2 or nbr.shape[1] != TAPS or nbr.shape[0] != m:
        raise ValueError(f"nbr must be (M, 49) = ({m}, 49) neighbour rows, got {tuple(getattr(nbr, 'shape', ()))}")
    if nbr.dtype != torch.int32:
        raise ValueError(f"nbr must be int32 (convert with nbr.to(torch.int32)), got {nbr.dtype}")
    if weight.dim() == 4 and tuple(weight.shape) == (c, 1, KERNEL_SIZE, KERNEL_SIZE):
        weight = weight.reshape(c, TAPS)  # a dense depthwise weight, same tap order
    if tuple(weight.shape) != (c, TAPS):
        raise ValueError(f"weight must be (C, 49) = ({c}, 49) or ({c}, 1, 7, 7), got {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    if bias is not None:
        if tuple(bias.shape) != (c,):
            raise ValueError(f"bias must be (C,) = ({c},), got {tuple(bias.shape)}")
        if not bias.is_floating_point():
            raise ValueError(f"bias must be a float tensor, got {bias.dtype}")
    for name, t in (("nbr", nbr), ("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them to one device")
    if check_values or (check_values is None and x.device.type == "cpu"):
        check_neighbour_values(nbr)
    return x.contiguous(), nbr.contiguous(), weight.contiguous(), (bias.contiguous() if bias is not None else None)


def neighbour_map(sites: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(M, 3) integer sites (sample, y, x) on an height x width grid -> (M, 49) int32 nbr.

    nbr[m, k] is the row of the site at (y + dy, x + dx) of the same sample,
    k = (dy+3)*7 + (dx+3), or -1 if that site is absent or off the grid.
    """
    if sites.dim() != 2 or sites.shape[1] != 3 or sites.is_floating_point():
        raise ValueError(f"sites must be (M, 3) integer (sample, y, x), got {tuple(sites.shape)} {sites.dtype}")
    sites = sites.long()
    m = sites.shape[0]
    if m == 0:
        return torch.empty(0, TAPS, dtype=torch.int32, device=sites.device)
    sample, y, x = sites.unbind(1)
    if int(sample.min()) < 0 or int(y.min()) < 0 or int(x.min()) < 0 or int(y.max()) >= height or int(x.max()) >= width:
        raise ValueError(f"sites must lie on the {height} x {width} grid with sample >= 0")
    table = torch.full((int(sample.max()) + 1, height + 2 * HALO, width + 2 * HALO), -1, dtype=torch.long,
                       device=sites.device)
    table[sample, y + HALO, x + HALO] = torch.arange(m, device=sites.device)
    if int((table >= 0).sum()) != m:
        raise ValueError("sites must be unique")
    taps = torch.arange(TAPS, device=sites.device)
    dy, dx = taps // KERNEL_SIZE, taps % KERNEL_SIZE  # already shifted by +HALO
    return table[sample[:, None], y[:, None] + dy, x[:, None] + dx].to(torch.int32)


def rows_dwconv_reference(x, nbr, weight, bias=None):
    """Plain torch, autograd for the backward: one gather-multiply per tap, fp32 accumulation,
    output in the compute dtype (x's, or autocast's)."""
    x, nbr, weight, bias = check_dwconv(x, nbr, weight, bias, check_values=False)
    dtype = compute_dtype(x)
    m, c = x.shape
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype).float()
        rows = torch.cat([xf, xf.new_zeros(1, c)])  # row m = absent
        index = torch.where(nbr >= 0, nbr.long(), torch.full_like(nbr, m, dtype=torch.long))
        out = torch.zeros(m, c, dtype=torch.float32, device=x.device)
        w = weight.float()
        for k in range(TAPS):
            out = out + rows[index[:, k]] * w[:, k]
        if bias is not None:
            out = out + bias.float()
        return out.to(dtype)


# -- C kernels (csrc/rows_dwconv.c) ------------------------------------------------------

_P, _I, _L, _F = cpu_build.PTR, cpu_build.INT, cpu_build.LONG, cpu_build.FLOAT
C_FORWARD = ("rows_dwconv_forward", [_P, _I, _P, _P, _P, _P, _I, _P, _P, _F, _P, _I, _P, _P, _L, _L, _I])
C_WEIGHT_GRAD = ("rows_dwconv_weight_grad", [_P, _I, _P, _P, _I, _P, _P, _L, _L, _I], _I)


def c_forward(x, nbr, weight_by_tap, bias, out_dtype, layernorm=None):
    """y = gather(x) (+ bias) in out_dtype; with layernorm = (ln_w, ln_b, eps, z_dtype) also
    z = LayerNorm(y) and its (mean, rstd). -> y, or (y, z, mean, rstd)."""
    m, c = x.shape
    y = torch.empty(m, c, dtype=out_dtype)
    z = mean = rstd = ln_w = ln_b = None
    eps, zdt = 0.0, 0
    if layernorm is not None:
        ln_w, ln_b, eps, z_dtype = layernorm
        z = torch.empty(m, c, dtype=z_dtype)
        mean, rstd = torch.empty(m), torch.empty(m)
        zdt = cpu_build.dtype_code(z)
    if m and c:
        cpu_build.function(*C_FORWARD)(
            cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(nbr), cpu_build.ptr(weight_by_tap),
            cpu_build.ptr(bias), cpu_build.ptr(y), cpu_build.dtype_code(y), cpu_build.ptr(ln_w), cpu_build.ptr(ln_b),
            eps, cpu_build.ptr(z), zdt, cpu_build.ptr(mean), cpu_build.ptr(rstd), m, c, cpu_build.threads(),
        )
    return y if layernorm is None else (y, z, mean, rstd)


def c_weight_grad(x, nbr, grad, with_bias: bool):
    """-> (grad weight (C, 49) fp32, grad bias (C,) fp32 or None)."""
    m, c = x.shape
    if m == 0 or c == 0:
        zeros = torch.zeros(c, TAPS)
        return zeros, (torch.zeros(c) if with_bias else None)
    threads = cpu_build.threads()
    partial_w = torch.empty(threads, TAPS, c)
    partial_b = torch.empty(threads, c) if with_bias else None
    used = cpu_build.function(*C_WEIGHT_GRAD)(
        cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(nbr), cpu_build.ptr(grad), cpu_build.dtype_code(grad),
        cpu_build.ptr(partial_w), cpu_build.ptr(partial_b), m, c, threads,
    )
    return partial_w[:used].sum(0).t(), (partial_b[:used].sum(0) if with_bias else None)


# -- Triton kernels ------------------------------------------------------------------------

if triton is not None:
    TAPS_C = tl.constexpr(TAPS)  # the constant inside the kernels

    @triton.jit
    def dwconv_gather_kernel(
        x_ptr,  # (M, C) features
        nbr_ptr,  # (M, 49) int32 neighbour rows, -1 = absent
        w_ptr,  # (49, C) fp32 weight, tap-major so each tap's channels are contiguous
        b_ptr,  # (C,) fp32 bias (ignored unless HAS_BIAS)
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
        nbr_rows = nbr_ptr + rows.to(tl.int64) * TAPS_C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for k in range(TAPS_C):
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
        for k in range(TAPS_C):
            acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for offset in range(0, rows_per_chunk, BLOCK_M):
                rows = first + offset + tl.arange(0, BLOCK_M)
                row_ok = rows < M
                rows64 = rows.to(tl.int64)
                src = tl.load(nbr_ptr + rows64 * TAPS_C + k, mask=row_ok, other=-1)
                present = src >= 0
                src = tl.where(present, src, 0).to(tl.int64)
                xv = tl.load(x_ptr + src[:, None] * C + cols[None, :], mask=present[:, None] & col_ok[None, :], other=0.0)
                gv = tl.load(g_ptr + rows64[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                             other=0.0)
                acc += tl.sum(xv.to(tl.float32) * gv.to(tl.float32), axis=0)
            tl.store(gw_ptr + (chunk * TAPS_C + k) * C + cols, acc, mask=col_ok)
        if HAS_BIAS:
            acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for offset in range(0, rows_per_chunk, BLOCK_M):
                rows = first + offset + tl.arange(0, BLOCK_M)
                row_ok = rows < M
                gv = tl.load(g_ptr + rows.to(tl.int64)[:, None] * C + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                acc += tl.sum(gv.to(tl.float32), axis=0)
            tl.store(gb_ptr + chunk * C + cols, acc, mask=col_ok)


def triton_forward(x, nbr, weight_by_tap, bias, out_dtype):
    """Launch the gather kernel: out = sum_k x[nbr[:, k]] * weight_by_tap[k] (+ bias)."""
    m, c = x.shape
    out = torch.empty(m, c, dtype=out_dtype, device=x.device)
    if m == 0 or c == 0:
        return out
    bc = block_c(c, DWCONV_MAX_BLOCK_C)
    dwconv_gather_kernel[(cdiv(m, BLOCK_M), cdiv(c, bc))](
        x, nbr, weight_by_tap, bias if bias is not None else weight_by_tap, out, m, c,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_C=bc,
    )
    return out


def triton_weight_grad(x, nbr, grad, with_bias: bool):
    """-> (grad weight (C, 49) fp32, grad bias (C,) fp32 or None), deterministic."""
    m, c = x.shape
    if m == 0:
        zeros = torch.zeros(c, TAPS, dtype=torch.float32, device=x.device)
        return zeros, (zeros[:, 0].clone() if with_bias else None)
    bc = block_c(c, DWCONV_MAX_BLOCK_C)
    c_blocks = cdiv(c, bc)
    # enough row chunks to fill the GPU, each a whole number of row blocks
    chunks = max(1, min(cdiv(TARGET_PROGRAMS, c_blocks), cdiv(m, BLOCK_M)))
    rows_per_chunk = cdiv(cdiv(m, chunks), BLOCK_M) * BLOCK_M
    chunks = cdiv(m, rows_per_chunk)
    partial_w = torch.empty(chunks, TAPS, c, dtype=torch.float32, device=x.device)
    partial_b = torch.empty(chunks, c, dtype=torch.float32, device=x.device) if with_bias else partial_w
    dwconv_weight_grad_kernel[(chunks, c_blocks)](
        x, nbr, grad, partial_w, partial_b, m, c, rows_per_chunk,
        HAS_BIAS=with_bias, BLOCK_M=BLOCK_M, BLOCK_C=bc,
    )
    return partial_w.sum(0).t(), (partial_b.sum(0) if with_bias else None)


# -- autograd -----------------------------------------------------------------------------

IMPLS = {
    "c": (c_forward, c_weight_grad),
    "triton": (triton_forward, triton_weight_grad),
}


def weight_by_tap(weight: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """(C, 49) weight -> (49, C) fp32 contiguous, taps flipped for the input gradient."""
    w = weight.float()
    return (w.flip(1) if flip else w).t().contiguous()


def kernel_input(x: torch.Tensor, impl: str) -> torch.Tensor:
    """x in the dtype the kernels read: the C kernels take float16 through float32."""
    return x.to(cpu_build.kernel_dtype(x.dtype)) if impl == "c" else x


class RowsDwconv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nbr, weight, bias, impl):
        forward, _ = IMPLS[impl]
        xk = kernel_input(x, impl)
        ctx.save_for_backward(xk, nbr, weight)
        ctx.impl, ctx.x_dtype, ctx.bias_dtype = impl, x.dtype, (bias.dtype if bias is not None else None)
        bias32 = bias.float().contiguous() if bias is not None else None
        return forward(xk, nbr, weight_by_tap(weight), bias32, xk.dtype).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xk, nbr, weight = ctx.saved_tensors
        forward, weight_grad = IMPLS[ctx.impl]
        grad = grad_out.to(xk.dtype).contiguous()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # the adjoint of a submanifold conv is the same gather with the taps flipped
            grad_x = forward(grad, nbr, weight_by_tap(weight, flip=True), None, xk.dtype).to(ctx.x_dtype)
        with_bias = ctx.bias_dtype is not None and ctx.needs_input_grad[3]
        if ctx.needs_input_grad[2] or with_bias:
            gw, gb = weight_grad(xk, nbr, grad, with_bias)
            grad_w = gw.to(weight.dtype) if ctx.needs_input_grad[2] else None
            grad_b = gb.to(ctx.bias_dtype) if with_bias else None
        return grad_x, None, grad_w, grad_b, None


def rows_dwconv(x, nbr, weight, bias=None, *, impl: str | None = None, check_values: bool | None = None):
    """Submanifold depthwise 7x7 on packed rows: (M, C) -> (M, C) in the compute dtype.

    impl: 'c' (CPU), 'triton' (CUDA, or CPU in Triton's interpreter), None = by device.
    check_values: validate nbr's values (range and symmetry; a device sync on CUDA); None =
    on CPU only. The range is always checked for the C kernels (it keeps their reads in
    bounds). The engine, which builds the map itself, passes False.
    """
    x, nbr, weight, bias = check_dwconv(x, nbr, weight, bias, check_values)
    impl = pick_impl(impl, x.device)
    ready_impl("rows_dwconv", impl, x)
    if impl == "c" and not check_values:
        check_neighbour_range(nbr)  # the C kernels read through it
    return RowsDwconv.apply(x.to(compute_dtype(x)), nbr, weight, bias, impl)
