"""Dense convolution over sparse sites on packed rows: `rows_gather_conv(x, nbr, weight)`.

The convolution of a sparse ResNet: x (M_in, C_in) holds the visible sites of one level as
packed rows; nbr (M_out, K) int32 names, for each output site m and tap k, the row of x
under that tap, -1 where that site is absent (or off the grid). Taps are in the ky-major
order of a dense weight (C_out, C_in, kh, kw), K = kh * kw.

    y[m, :] = sum_k x[nbr[m, k], :] @ weight[:, :, k].T          (M_out, C_out), no bias

One op serves every conv of a ResNet: the submanifold 3x3 (output sites = input sites, the
map symmetric), and the strided ones (3x3 stride 2, the 1x1 stride-2 downsample, the 7x7
stride-2 stem), whose map reads the finer level's rows. `gather_conv_map` builds a map from
site coordinates.

How it runs:
- C (CPU): for a small weight (FUSED_MAX_WEIGHT_BYTES) a fused gather-GEMM in C reads the
  gathered rows in place (AVX-512, bf16 dot products): faster than oneDNN at the stem and
  the first stage, where oneDNN's GEMM is narrow (64 output channels). Otherwise a C gather
  writes the columns (M_out, K * C_in) (im2col, csrc/rows_gather_conv.c) and one torch GEMM
  (oneDNN) gives y; the gather is 1-14% of that at ResNet-50's later shapes
  (benchmarks/gather_conv.py --split). Backward, two more products:
  - grad weight = columns^T @ grad y, the columns gathered again (keeping them from the
    forward would hold K times x's memory until the backward);
  - grad x, two ways, both deterministic and without atomics. With `transposed` given (the
    map's transpose; a submanifold map's is nbr.flip(1), free): the same gathered conv of
    grad y through it, with the weight's channels swapped; every element one float32 sum in
    the GEMM. Otherwise (strided maps): the columns' gradient grad y @ w^T (one GEMM), summed
    back into rows by a C scatter whose threads own channel slices. Measured at batch 8,
    mask 0.6, bf16, 1 thread: through the transpose 4.4 / 4.1 ms vs the scatter 5.4 / 4.7 ms
    at 28x28x128 / 14x14x256 3x3 stride 1; on strided maps the transpose has 4x the rows, 3/4
    of its taps absent, and costs 16.2 / 14.5 ms vs 5.5 / 5.1 ms for the scatter (3x3 and
    1x1 stride 2), and building it (1-5 ms) would eat the submanifold gain.
- Triton (CUDA): the gather fused into the GEMM (tiles of gathered rows fed to tl.dot), the
  same three products; grad x always through the transposed map (built once per map and
  kept on it when not given), as a scatter would need atomics on a GPU.
Features are read and written in their dtype (float32 and bfloat16; float16 through float32
in C), products accumulate in float32; the weight is used in the features' dtype (as a
dense conv under autocast does) and its gradient comes back in the weight's dtype. Under
autocast x is first cast to the autocast dtype.

In this file: the checks, `gather_conv_map` and `transpose_map`, the plain-torch reference
`rows_gather_conv_reference`, the C launchers, the Triton kernels and launchers, and the
autograd function.
"""
from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.common import check_rows, compute_dtype, pick_impl, ready_impl
from sparse_mae_kernels.triton_runtime import BLOCK_M, TARGET_PROGRAMS, block_c, cdiv, interpreter_active, tl, triton

GATHER_CONV_MAX_BLOCK_N = 64  # output channels per Triton program
GATHER_CONV_MAX_BLOCK_K = 32  # input channels per tl.dot step

# -- contract ---------------------------------------------------------------------------


def check_map_range(nbr: torch.Tensor, m_in: int, name: str = "nbr") -> None:
    """Rows in [-1, m_in): keeps the kernels' reads in bounds. Checked once per version of the
    map (a ResNet stage passes one map to all its blocks; an in-place write bumps the version)."""
    key = (nbr._version, m_in)
    if getattr(nbr, "_sparse_mae_gather_range_checked", None) == key:
        return
    if nbr.numel() and (int(nbr.min()) < -1 or int(nbr.max()) >= m_in):
        raise ValueError(f"{name} values must be rows of x in [0, {m_in}) or -1 for an absent site, "
                         f"got values in [{int(nbr.min())}, {int(nbr.max())}]")
    nbr._sparse_mae_gather_range_checked = key


def check_map(nbr, m_out: int | None, taps: int, device: torch.device, name: str = "nbr") -> None:
    """nbr must be (M_out, K) int32 on x's device (M_out free when m_out is None)."""
    if not isinstance(nbr, torch.Tensor) or nbr.dim() != 2 or nbr.shape[1] != taps or (
            m_out is not None and nbr.shape[0] != m_out):
        rows = "M_out" if m_out is None else m_out
        raise ValueError(f"{name} must be ({rows}, K) = ({rows}, {taps}) rows, one column per tap of the "
                         f"weight, got {tuple(getattr(nbr, 'shape', ()))}")
    if nbr.dtype != torch.int32:
        raise ValueError(f"{name} must be int32 (convert with {name}.to(torch.int32)), got {nbr.dtype}")
    if nbr.device != device:
        raise ValueError(f"{name} is on {nbr.device} but x is on {device}; move them to one device")


def check_gather_conv(x, nbr, weight, transposed, check_values: bool | None):
    """Validate and make contiguous -> (x, nbr, weight, transposed).

    check_values: also check the maps' values (a device sync on CUDA); None = on CPU only."""
    m_in, c_in = check_rows(x)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[1] != c_in:
        raise ValueError(f"weight must be a dense conv weight (C_out, C_in, kh, kw) with C_in = {c_in} "
                         f"(x's channels), got {tuple(getattr(weight, 'shape', ()))}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}; move them to one device")
    taps = weight.shape[2] * weight.shape[3]
    check_map(nbr, None, taps, x.device)
    if transposed is not None:
        check_map(transposed, m_in, taps, x.device, "transposed")
    if check_values or (check_values is None and x.device.type == "cpu"):
        check_map_range(nbr, m_in)
        if transposed is not None and not torch.equal(transposed, transpose_map(nbr, m_in, check_values=True)):
            raise ValueError("transposed is not nbr's transpose (transposed[nbr[m, k], k] = m, -1 elsewhere): "
                             "pass nbr.flip(1) for a submanifold map, transpose_map(nbr, M_in), or None")
    return (x.contiguous(), nbr.contiguous(), weight.contiguous(),
            transposed.contiguous() if transposed is not None else None)


def _pair(v, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(p, int) for p in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair


def gather_conv_map(coords_out: torch.Tensor, coords_in: torch.Tensor, kernel, stride=1, padding=None) -> torch.Tensor:
    """The map of a conv (kernel, stride, padding) from the sites coords_in to the sites coords_out.

    coords: (M, 3) integer (sample, y, x), each site once; coords_out on the output grid.
    -> nbr (M_out, kh * kw) int32: nbr[m, ky * kw + kx] is the row of coords_in at
    (sample, y * sy - py + ky, x * sx - px + kx) for coords_out[m] = (sample, y, x), or -1
    where no site is there. padding defaults to kernel // 2 (ResNet's: 3x3 pad 1, 7x7 pad 3,
    1x1 pad 0). Submanifold: coords_out = coords_in, stride 1.
    """
    (kh, kw), (sy, sx) = _pair(kernel, "kernel"), _pair(stride, "stride")
    py, px = _pair(padding, "padding") if padding is not None else (kh // 2, kw // 2)
    if min(kh, kw, sy, sx) < 1 or min(py, px) < 0:
        raise ValueError(f"kernel and stride must be >= 1 and padding >= 0, got kernel {kernel}, "
                         f"stride {stride}, padding {padding}")
    for name, c in (("coords_out", coords_out), ("coords_in", coords_in)):
        if not isinstance(c, torch.Tensor) or c.dim() != 2 or c.shape[1] != 3 or c.is_floating_point():
            raise ValueError(f"{name} must be (M, 3) integer (sample, y, x), got "
                             f"{tuple(getattr(c, 'shape', ()))} {getattr(c, 'dtype', None)}")
        if c.numel() and int(c.min()) < 0:
            raise ValueError(f"{name} must be >= 0 (sample, y, x on the grid)")
    device = coords_in.device
    out, inp = coords_out.long().to(device), coords_in.long()
    m_out = out.shape[0]
    if m_out == 0 or inp.shape[0] == 0:
        return torch.full((m_out, kh * kw), -1, dtype=torch.int32, device=device)
    # sites as one integer key on the input grid (height x width covers every input site)
    height, width = int(inp[:, 1].max()) + 1, int(inp[:, 2].max()) + 1
    keys = (inp[:, 0] * height + inp[:, 1]) * width + inp[:, 2]
    sorted_keys, order = keys.sort()
    if bool((sorted_keys.diff() == 0).any()):
        raise ValueError("coords_in must hold each site once")
    if torch.unique(out, dim=0).shape[0] != m_out:
        raise ValueError("coords_out must hold each site once")
    ky, kx = torch.meshgrid(torch.arange(kh, device=device), torch.arange(kw, device=device), indexing="ij")
    y = out[:, 1:2] * sy - py + ky.reshape(1, -1)  # (M_out, K)
    x = out[:, 2:3] * sx - px + kx.reshape(1, -1)
    on_grid = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    query = (out[:, 0:1] * height + y.clamp(0, height - 1)) * width + x.clamp(0, width - 1)
    pos = torch.searchsorted(sorted_keys, query).clamp(max=keys.numel() - 1)
    found = on_grid & (sorted_keys[pos] == query)
    return torch.where(found, order[pos], -1).to(torch.int32)


def transpose_map(nbr: torch.Tensor, m_in: int, check_values: bool | None = None) -> torch.Tensor:
    """(M_out, K) map -> its transpose (M_in, K): t[i, k] = m where nbr[m, k] = i, else -1.

    The input gradient is the gathered conv of grad y through it. Well defined for a conv's
    map: two output sites read two different input sites at the same tap. check_values
    (None = on CPU) verifies that (it costs a device sync on CUDA)."""
    m_out, taps = nbr.shape
    out = torch.full((m_in, taps), -1, dtype=torch.int32, device=nbr.device)
    present = nbr >= 0
    rows = torch.arange(m_out, dtype=torch.int32, device=nbr.device).unsqueeze(1).expand(m_out, taps)
    tap = torch.arange(taps, device=nbr.device).expand(m_out, taps)
    out[nbr.long()[present], tap[present]] = rows[present]
    if check_values or (check_values is None and nbr.device.type == "cpu"):
        if int((out >= 0).sum()) != int(present.sum()):
            raise ValueError("nbr is not a convolution's map: two output rows read the same row of x at the same "
                             "tap (build it with gather_conv_map from unique site coordinates)")
    return out


def cached_transpose(nbr: torch.Tensor, m_in: int) -> torch.Tensor:
    """transpose_map(nbr, m_in), built once per version of nbr and kept on it (a stage's blocks
    share one map)."""
    key = (nbr._version, m_in)
    cached = getattr(nbr, "_sparse_mae_transposed", None)
    if cached is None or cached[0] != key:
        cached = (key, transpose_map(nbr, m_in))
        nbr._sparse_mae_transposed = cached
    return cached[1]


def rows_gather_conv_reference(x, nbr, weight):
    """Plain torch, autograd for the backward: x with a zero row appended (row M_in = absent),
    indexed by the map, one matmul in float32; output in the compute dtype (x's, or autocast's)."""
    x, nbr, weight, _ = check_gather_conv(x, nbr, weight, None, check_values=False)
    dtype = compute_dtype(x)
    m_in, c_in = x.shape
    c_out = weight.shape[0]
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(dtype).float()
        rows = torch.cat([xf, xf.new_zeros(1, c_in)])
        index = torch.where(nbr >= 0, nbr.long(), m_in)
        cols = rows[index].reshape(nbr.shape[0], -1)  # (M_out, K * C_in), tap-major
        w = weight.to(dtype).float().permute(0, 2, 3, 1).reshape(c_out, -1)  # (C_out, K * C_in), same order
        return (cols @ w.t()).to(dtype)


# -- weight layouts -------------------------------------------------------------------------
# Every product is columns (M, K * C_in') @ rows^T, with rows (C_out', K * C_in') tap-major
# (row o, column k * C_in' + i), so the weight gradient comes out as rows too. The reorders
# are copies of the weight, which at ResNet-50's last stage (512 x 512 x 3 x 3) cost as much
# as its GEMM: one per direction, the forward's rows kept for the backward (a cheap block
# permute of them is the input gradient's), and no (K * C_in, C_out) layout (its way back to
# (C_out, C_in, kh, kw) took 12 ms on one core, against 2 ms from rows).


def weight_rows(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, kh, kw) -> (C_out, K * C_in) in dtype: column k * C_in + i multiplies
    x[nbr[m, k], i]."""
    return weight.to(dtype).permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def transposed_rows(w_rows: torch.Tensor, taps: int) -> torch.Tensor:
    """The forward's rows -> the input gradient's (C_in, K * C_out) (a transposed view of a
    (K * C_out, C_in) copy): column k * C_out + o multiplies grad_y[t[i, k], o]."""
    c_out, c_in = w_rows.shape[0], w_rows.shape[1] // taps
    return w_rows.view(c_out, taps, c_in).transpose(0, 1).reshape(taps * c_out, c_in).t()


def weight_from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(C_out, K * C_in) -> (C_out, C_in, kh, kw): weight_rows' inverse."""
    c_out, c_in, kh, kw = shape
    return rows.view(c_out, kh, kw, c_in).permute(0, 3, 1, 2).contiguous()


# -- C kernels (csrc/rows_gather_conv.c) + torch GEMMs ----------------------------------------

_P, _L, _I = cpu_build.PTR, cpu_build.LONG, cpu_build.INT
C_GATHER = ("rows_gather_cols", [_P, _P, _P, _L, _L, _L, _L, _I])
C_SCATTER = ("rows_scatter_cols", [_P, _I, _P, _P, _L, _L, _L, _I])
C_FUSED = ("rows_gather_conv_fused", [_P, _I, _P, _P, _P, _P, _L, _L, _L, _L, _I], _I)
# The fused gather-GEMM streams the weight once per 6 output rows, so it pays only while the
# weight stays in the core's L2 (1 MB on Zen 4). Measured on one core at ResNet-50's shapes
# (csrc/rows_gather_conv.c has the numbers): in float32 it beats gather + oneDNN up to
# 28x28x128 (590 KB), ties at the 1x1 stride-2 downsample, loses beyond; in bfloat16, whose
# oneDNN GEMM is closer to ours, it wins at the stem and 56x56x64 (74 KB), ties at
# 28x28x128 and loses ~15% at the 256 -> 512 downsample (256 KB).
FUSED_MAX_WEIGHT_BYTES = {torch.float32: 1 << 20, torch.bfloat16: 1 << 17}


def c_gather_cols(x: torch.Tensor, nbr: torch.Tensor) -> torch.Tensor:
    """The columns (M_out, K * C) of x gathered through nbr, in x's dtype."""
    m_out, taps = nbr.shape
    c = x.shape[1]
    cols = torch.empty(m_out, taps * c, dtype=x.dtype)
    if cols.numel():
        cpu_build.function(*C_GATHER)(cpu_build.ptr(x), cpu_build.ptr(nbr), cpu_build.ptr(cols), m_out, taps, c,
                                      x.element_size(), cpu_build.threads())
    return cols


def fused_weight(w_rows: torch.Tensor, taps: int) -> torch.Tensor:
    """Rows (C_out, K * C_in) -> the fused kernel's packing: float32 (K, C_in, Op), bfloat16
    (K, ceil(C_in / 2), Op, 2) pairs of input channels; Op = C_out rounded up to 32, zeros."""
    c_out, c_in = w_rows.shape[0], w_rows.shape[1] // taps
    pair = 2 if w_rows.dtype == torch.bfloat16 else 1
    c_pad, o_pad = -(-c_in // pair) * pair, -(-c_out // 32) * 32
    packed = w_rows.new_zeros(taps, c_pad, o_pad)
    packed[:, :c_in, :c_out] = w_rows.reshape(c_out, taps, c_in).permute(1, 2, 0)
    if pair == 1:
        return packed
    return packed.view(taps, c_pad // 2, 2, o_pad).transpose(2, 3).contiguous()


def c_fused_runs(dtype: torch.dtype, weight_bytes: int) -> bool:
    """Whether the C forward of a weight of `weight_bytes` in `dtype` takes the fused gather-GEMM
    (small weights, where this build has it: AVX-512, and AVX512-BF16 for bfloat16)."""
    return weight_bytes <= FUSED_MAX_WEIGHT_BYTES.get(dtype, -1) and _c_has_fused(dtype)


@functools.cache
def _c_has_fused(dtype: torch.dtype) -> bool:
    # an empty call: the C entry point says whether it has a fused kernel for the dtype
    return bool(cpu_build.function(*C_FUSED)(None, cpu_build.DTYPE_CODES[dtype], None, None, None, None,
                                             0, 1, 1, 1, 1))


def uncounted_macs(m_out: int, weight: torch.Tensor, dtype: torch.dtype, impl: str) -> int:
    """MACs of one forward that FlopCounterMode does not see: the whole product in Triton and in
    the C fused kernel; none when the C gather feeds torch.mm (a counted op). dtype: x's."""
    c_out, c_in, kh, kw = weight.shape
    macs = m_out * kh * kw * c_in * c_out
    if impl == "triton":
        return macs
    dtype = cpu_build.kernel_dtype(dtype)
    return macs if c_fused_runs(dtype, weight.numel() * torch.empty(0, dtype=dtype).element_size()) else 0


def c_forward(x, nbr, w_rows):
    """y (M_out, C_out) = columns(x) @ w_rows^T in x's dtype, float32 sums: the fused kernel for
    a small weight where this build has it, else the C gather and oneDNN's GEMM."""
    m_out, taps = nbr.shape
    c_out = w_rows.shape[0]
    if m_out and c_out and w_rows.numel() * w_rows.element_size() <= FUSED_MAX_WEIGHT_BYTES.get(x.dtype, -1):
        y = torch.empty(m_out, c_out, dtype=x.dtype)
        packed, zero_row = fused_weight(w_rows, taps), x.new_zeros(x.shape[1])  # alive through the call
        ran = cpu_build.function(*C_FUSED)(
            cpu_build.ptr(x), cpu_build.dtype_code(x), cpu_build.ptr(nbr), cpu_build.ptr(packed),
            cpu_build.ptr(zero_row), cpu_build.ptr(y), m_out, taps, x.shape[1], c_out, cpu_build.threads())
        if ran:
            return y
    return torch.mm(c_gather_cols(x, nbr), w_rows.t())


def c_input_grad(grad, nbr, w_rows, m_in):
    """grad x (M_in, C_in) without a transposed map: the columns' gradient grad @ w^T, summed
    back into rows by the C scatter (float32 sums, deterministic), in grad's dtype."""
    m_out, taps = nbr.shape
    c_in = w_rows.shape[1] // taps
    grad_x = torch.zeros(m_in, c_in)
    if m_out and c_in and grad_x.numel():
        grad_cols = torch.mm(grad, w_rows)  # (M_out, K * C_in)
        cpu_build.function(*C_SCATTER)(cpu_build.ptr(grad_cols), cpu_build.dtype_code(grad_cols), cpu_build.ptr(nbr),
                                       cpu_build.ptr(grad_x), m_out, taps, c_in, cpu_build.threads())
    return grad_x.to(grad.dtype)


def c_weight_grad(x, nbr, grad):
    """(C_out, K * C_in) = grad^T @ columns(x), float32. In bfloat16 / float16 the GEMM
    accumulates in float32 and rounds its result once (what a dense conv's weight gradient
    under autocast does); a float32 GEMM on upcast inputs costs twice the time."""
    return torch.mm(grad.t(), c_gather_cols(x, nbr)).float()


# -- Triton kernels ------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def gather_conv_kernel(
        x_ptr,  # (M_in, C_IN) features
        nbr_ptr,  # (M, K) int32 rows of x per tap, -1 = absent
        w_ptr,  # (C_OUT, K * C_IN) weight rows (weight_rows), x's dtype
        out_ptr,  # (M, C_OUT)
        M,
        K,
        C_IN,
        C_OUT,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,  # see dot_in_fp32
    ):
        """out[m, n] = sum_k sum_i x[nbr[m, k], i] * w[n, k * C_IN + i]: gathered rows of x fed
        straight to tl.dot, one (BLOCK_M, BLOCK_N) tile of out per program, float32 accumulator."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < M
        col_ok = cols < C_OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(K):
            src = tl.load(nbr_ptr + rows.to(tl.int64) * K + k, mask=row_ok, other=-1)
            present = src >= 0
            src = tl.where(present, src, 0).to(tl.int64)  # keep masked-off addresses in bounds
            for i0 in range(0, C_IN, BLOCK_K):
                chans = i0 + tl.arange(0, BLOCK_K)
                chan_ok = chans < C_IN
                a = tl.load(x_ptr + src[:, None] * C_IN + chans[None, :], mask=present[:, None] & chan_ok[None, :],
                            other=0.0)
                b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * (K * C_IN) + (k * C_IN + chans)[:, None],
                            mask=chan_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
                if DOT_FP32:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision="ieee")  # fp32 features: no TF32 rounding
        out = out_ptr + rows.to(tl.int64)[:, None] * C_OUT + cols[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def gather_conv_weight_grad_kernel(
        x_ptr,  # (M_in, C_IN) forward input
        nbr_ptr,  # (M, K) int32
        g_ptr,  # (M, C_OUT) gradient of the output
        gw_ptr,  # (chunks, C_OUT, K * C_IN) fp32 partial weight gradients, one slab per row chunk
        M,
        K,
        C_IN,
        C_OUT,
        rows_per_chunk,  # a multiple of BLOCK_M
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,  # see dot_in_fp32
    ):
        """gw[n, k * C_IN + i] = sum over the chunk's rows m of x[nbr[m, k], i] * g[m, n].

        Program (tap k and a block of input channels, a block of output channels, a chunk of
        rows) owns its slab: no atomics, deterministic; the launcher sums the few slabs."""
        i_blocks = tl.cdiv(C_IN, BLOCK_K)
        k = tl.program_id(0) // i_blocks
        chans = (tl.program_id(0) % i_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        chunk = tl.program_id(2)
        chan_ok = chans < C_IN
        col_ok = cols < C_OUT
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        first = chunk * rows_per_chunk
        for offset in range(0, rows_per_chunk, BLOCK_M):
            rows = first + offset + tl.arange(0, BLOCK_M)
            row_ok = rows < M
            rows64 = rows.to(tl.int64)
            src = tl.load(nbr_ptr + rows64 * K + k, mask=row_ok, other=-1)
            present = src >= 0
            src = tl.where(present, src, 0).to(tl.int64)
            a = tl.load(x_ptr + src[None, :] * C_IN + chans[:, None], mask=chan_ok[:, None] & present[None, :],
                        other=0.0)  # (BLOCK_K, BLOCK_M): the columns, transposed
            g = tl.load(g_ptr + rows64[:, None] * C_OUT + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            if DOT_FP32:
                a, g = a.to(tl.float32), g.to(tl.float32)
            acc = tl.dot(a, g, acc, input_precision="ieee")
        slab = gw_ptr + chunk.to(tl.int64) * C_OUT * K * C_IN
        tl.store(slab + cols.to(tl.int64)[None, :] * (K * C_IN) + (k * C_IN + chans)[:, None], acc,
                 mask=chan_ok[:, None] & col_ok[None, :])


def dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether the kernels upcast tl.dot's operands to float32: only for bfloat16 in Triton's CPU
    interpreter, whose dot multiplies bfloat16's raw bits as integers (Triton 3.x, create_dot).
    The same numbers: products of bfloat16 values are exact in float32, and the compiled bf16
    dot accumulates in float32 too."""
    return dtype == torch.bfloat16 and interpreter_active()


def triton_blocks(c_in: int, c_out: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) for C_out and C_in output and input channels."""
    return block_c(c_out, GATHER_CONV_MAX_BLOCK_N), block_c(c_in, GATHER_CONV_MAX_BLOCK_K)


def triton_forward(x, nbr, w_rows):
    """y (M_out, C_out) = the gathered conv, in x's dtype."""
    m_out, taps = nbr.shape
    c_in, c_out = x.shape[1], w_rows.shape[0]
    w_rows = w_rows.contiguous()  # the input gradient's rows are a transposed view
    out = torch.empty(m_out, c_out, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bn, bk = triton_blocks(c_in, c_out)
    gather_conv_kernel[(cdiv(m_out, BLOCK_M), cdiv(c_out, bn))](
        x, nbr, w_rows, out, m_out, taps, c_in, c_out, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk,
        DOT_FP32=dot_in_fp32(x.dtype),
    )
    return out


def triton_input_grad(grad, nbr, w_rows, m_in):
    """grad x (M_in, C_in) without a transposed map: it is built (once per map) and gathered
    through; a scatter would need atomics."""
    return triton_forward(grad, cached_transpose(nbr, m_in), transposed_rows(w_rows, nbr.shape[1]))


def triton_weight_grad(x, nbr, grad):
    """(C_out, K * C_in) float32, deterministic."""
    m_out, taps = nbr.shape
    c_in, c_out = x.shape[1], grad.shape[1]
    if m_out == 0 or c_in == 0 or c_out == 0:
        return torch.zeros(c_out, taps * c_in, dtype=torch.float32, device=x.device)
    bn, bk = triton_blocks(c_in, c_out)
    tiles = taps * cdiv(c_in, bk) * cdiv(c_out, bn)
    # enough row chunks to fill the GPU, each a whole number of row blocks
    chunks = max(1, min(cdiv(TARGET_PROGRAMS, tiles), cdiv(m_out, BLOCK_M)))
    rows_per_chunk = cdiv(cdiv(m_out, chunks), BLOCK_M) * BLOCK_M
    chunks = cdiv(m_out, rows_per_chunk)
    partial = torch.empty(chunks, c_out, taps * c_in, dtype=torch.float32, device=x.device)
    gather_conv_weight_grad_kernel[(taps * cdiv(c_in, bk), cdiv(c_out, bn), chunks)](
        x, nbr, grad, partial, m_out, taps, c_in, c_out, rows_per_chunk, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk,
        DOT_FP32=dot_in_fp32(x.dtype),
    )
    return partial.sum(0)


# -- autograd -----------------------------------------------------------------------------

IMPLS = {  # (forward, input grad without a transposed map, weight grad)
    "c": (c_forward, c_input_grad, c_weight_grad),
    "triton": (triton_forward, triton_input_grad, triton_weight_grad),
}


def kernel_input(x: torch.Tensor, impl: str) -> torch.Tensor:
    """x in the dtype the kernels read: the C scatter takes float16 through float32."""
    return x.to(cpu_build.kernel_dtype(x.dtype)) if impl == "c" else x


class RowsGatherConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, nbr, weight, transposed, impl):
        forward, _, _ = IMPLS[impl]
        xk = kernel_input(x, impl)
        w_rows = weight_rows(weight, xk.dtype)
        ctx.save_for_backward(xk, nbr, w_rows, transposed)  # the rows: a copy fewer in the backward
        ctx.impl, ctx.x_dtype, ctx.weight_shape, ctx.weight_dtype = impl, x.dtype, weight.shape, weight.dtype
        return forward(xk, nbr, w_rows).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        xk, nbr, w_rows, transposed = ctx.saved_tensors
        forward, input_grad, weight_grad = IMPLS[ctx.impl]
        grad = grad_out.to(xk.dtype).contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if transposed is not None:
                # the adjoint of a gathered conv: the gathered conv of grad y through the
                # transposed map, with the weight's channels swapped
                grad_x = forward(grad, transposed, transposed_rows(w_rows, nbr.shape[1]))
            else:
                grad_x = input_grad(grad, nbr, w_rows, xk.shape[0])
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_w = weight_from_rows(weight_grad(xk, nbr, grad), ctx.weight_shape).to(ctx.weight_dtype)
        return grad_x, None, grad_w, None, None


# torch.compile must run the op whole: traced into, its C calls wrote outputs dynamo had
# already replaced (the compiled SparK step's loss was NaN)
@torch.compiler.disable
def rows_gather_conv(x, nbr, weight, *, transposed=None, impl: str | None = None,
                     check_values: bool | None = None):
    """Dense conv weight (C_out, C_in, kh, kw) over sparse sites: (M_in, C_in) rows and an
    (M_out, kh * kw) map -> (M_out, C_out) in the compute dtype. No bias (a ResNet's BN follows).

    transposed: the map's transpose (M_in, K) (transpose_map), where the caller has it for
    free: a submanifold map's is nbr.flip(1). The input gradient then gathers through it
    (faster on CPU at stride 1); else the C kernels scatter and Triton builds it.
    impl: 'c' (CPU), 'triton' (CUDA, or CPU in Triton's interpreter), None = by device.
    check_values: check the maps' values (a device sync on CUDA); None = on CPU only. The C
    kernels check nbr's range always (it keeps their reads in bounds).
    """
    x, nbr, weight, transposed = check_gather_conv(x, nbr, weight, transposed, check_values)
    impl = pick_impl(impl, x.device)
    ready_impl("rows_gather_conv", impl, x)
    if impl == "c" and not check_values:
        check_map_range(nbr, x.shape[0])  # the C gather reads through them
        if transposed is not None:
            check_map_range(transposed, nbr.shape[0], "transposed")
    return RowsGatherConv.apply(x.to(compute_dtype(x)), nbr, weight, transposed, impl)
