"""Native sparse ResNet encoder (SparK's model, `NativeBackend.encode_stages`): every op on
packed rows, one row per visible site, so the work is the visible fraction of the dense one.

Rows at a grid with s sites per patch side are packed (patch, y, x) as in layout.py, patches
sample-major; the pixels are the grid s = 32, conv1's output s = 16, the max-pool's and
layer1's s = 8, down to layer4's s = 1. Each op maps the visible sites of one grid to the
visible sites of the next (docs/design.md section 7):

- 1x1 stride-1 convs: a matmul on the rows.
- every other conv (conv1's 7x7/2 on the pixels, the 3x3s, the strided 3x3 and the 1x1/2
  downsample): `gather_conv(x, nbr, weight)` over a neighbour map (M_out, kh*kw) of input
  rows, -1 where the tap falls on a removed site or outside the image (zero there, as the
  dense zero-filled map and its zero padding have).
- BatchNorm: statistics over the rows of the whole batch (`batch_norm_rows`; SyncBatchNorm
  all-reduces them).
- max-pool: the maximum over the visible taps of the neighbour map.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

import sparse_mae_kernels
from sparse_mae.backends.native.layout import SparseLayout
from sparse_mae.models.geometry import PATCH
from sparse_mae.models.resnet import is_pointwise
from sparse_mae.models.sparse_norm import batch_norm_rows
from sparse_mae_kernels.common import FLOAT_DTYPES, compute_dtype
from sparse_mae_kernels.ops.rows_gather_conv import rows_gather_conv as kernel_gather_conv
from sparse_mae_kernels.ops.rows_gather_conv import uncounted_macs as kernel_uncounted_macs

if TYPE_CHECKING:
    from sparse_mae.models.resnet import ResNet


def rows_gather_conv(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Convolution on packed rows through a neighbour map (plain torch: gather, then a matmul).

    x (M_in, C_in); nbr (M_out, kh*kw) int rows of x, -1 absent (zero), taps in ky-major
    order; weight (C_out, C_in, kh, kw), a dense conv's. -> (M_out, C_out).
    """
    m_in, c_in = x.shape
    m_out, taps = nbr.shape
    c_out = weight.shape[0]
    if weight.shape[1] != c_in or weight.shape[2] * weight.shape[3] != taps:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x (M, {c_in}) and {taps} taps")
    padded = torch.cat([x, x.new_zeros(1, c_in)])  # row m_in: the zero of absent taps
    index = torch.where(nbr < 0, m_in, nbr).reshape(-1).long()
    columns = padded.index_select(0, index).view(m_out, taps * c_in)  # (tap, channel) per output row
    return F.linear(columns, weight.permute(0, 2, 3, 1).reshape(c_out, taps * c_in))


def gather_conv(x: torch.Tensor, nbr: torch.Tensor, weight: torch.Tensor,
                transposed: torch.Tensor | None = None) -> torch.Tensor:
    """The one place the gather conv is chosen: the compiled kernel (C on the CPU, Triton on
    CUDA; sparse_mae_kernels.ops.rows_gather_conv) where it runs, else `rows_gather_conv`'s
    torch ops. `transposed`: the map's transpose where it is free (a submanifold map's is its
    flipped taps), which lets the kernel's input gradient gather instead of scatter. float64
    (the fidelity tests' dtype) has no kernel: torch ops."""
    if x.dtype not in FLOAT_DTYPES or weight.dtype not in FLOAT_DTYPES:
        return rows_gather_conv(x, nbr, weight)
    impl = sparse_mae_kernels.row_impl(x.device)
    if impl is None:
        return rows_gather_conv(x, nbr, weight)
    return kernel_gather_conv(x, nbr, weight, transposed=transposed, impl=impl)


def kernel_conv_macs(encoder: ResNet, imgs: torch.Tensor, mask: torch.Tensor) -> int:
    """MACs of this batch's gather convs that the compiled kernel runs outside torch ops
    (FlopCounterMode cannot see them; each output row reads every tap, absent ones as zeros);
    0 where torch ops run them."""
    if not (imgs.dtype in FLOAT_DTYPES and next(encoder.parameters()).dtype in FLOAT_DTYPES):
        return 0
    impl = sparse_mae_kernels.row_impl(imgs.device)
    if impl is None:
        return 0
    visible, dtype = int((mask == 0).sum()), compute_dtype(imgs)
    return sum(kernel_uncounted_macs(visible * (PATCH // (stride * conv.stride[0])) ** 2, conv.weight, dtype, impl)
               for conv, stride in encoder.convs() if not is_pointwise(conv))


class ResNetLayout:
    """Neighbour maps between the grids of one batch's visible patches, built on demand.

    A conv (k x k, stride t, padding k // 2) from the grid with s_in sites per patch side to
    s_in / t: output site (y, x) of a patch reads input sites (t*y - k//2 + ky, t*x - k//2 + kx).
    Masks are patch aligned and t divides s_in, so the output sites of a visible patch are
    exactly the visible patch's sites on the coarser grid.
    """

    def __init__(self, mask: torch.Tensor):
        self.patches = SparseLayout(mask)  # validates the mask; patch_sample / _y / _x, sample-major
        self._canvases: dict[tuple[int, int], torch.Tensor] = {}
        self._maps: dict[tuple[int, int, int], torch.Tensor] = {}

    def _site_coords(self, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sample, y, x) on the full grid of every packed row at `side`, each (P, side, side)."""
        pl = self.patches
        t = torch.arange(side, device=pl.device)
        p = pl.num_patches
        ys = (pl.patch_y * side).view(p, 1, 1) + t.view(1, side, 1)
        xs = (pl.patch_x * side).view(p, 1, 1) + t.view(1, 1, side)
        return pl.patch_sample.view(p, 1, 1).expand(p, side, side), ys.expand(p, side, side), xs.expand(p, side, side)

    def _canvas(self, side: int, pad: int) -> torch.Tensor:
        """(N, h*side + 2 pad, w*side + 2 pad) int32: the packed row of each visible site, -1 elsewhere."""
        key = (side, pad)
        if key not in self._canvases:
            pl = self.patches
            (h, w), n = pl.grid, pl.batch
            canvas = torch.full((n, h * side + 2 * pad, w * side + 2 * pad), -1, dtype=torch.int32, device=pl.device)
            sample, ys, xs = self._site_coords(side)
            rows = torch.arange(pl.num_patches * side * side, dtype=torch.int32, device=pl.device)
            canvas[sample.reshape(-1), ys.reshape(-1) + pad, xs.reshape(-1) + pad] = rows
            self._canvases[key] = canvas
        return self._canvases[key]

    def neighbours(self, side_in: int, kernel: int, stride: int) -> torch.Tensor:
        """(M_out, kernel**2) int32 rows of the input grid (side_in) read by each output site
        (side_in // stride), ky-major, -1 where absent; padding kernel // 2."""
        key = (side_in, kernel, stride)
        if key not in self._maps:
            pad = kernel // 2
            canvas = self._canvas(side_in, pad)
            n, hp, wp = canvas.shape
            sample, ys, xs = self._site_coords(side_in // stride)
            # the window's top-left corner on the padded canvas is (t*y, t*x): -pad + pad
            origin = (sample * hp + ys * stride) * wp + xs * stride
            t = torch.arange(kernel, device=canvas.device)
            taps = (t.view(-1, 1) * wp + t.view(1, -1)).reshape(-1)
            self._maps[key] = canvas.view(-1)[origin.reshape(-1, 1) + taps]
        return self._maps[key]

    def submanifold_transpose(self, side: int, kernel: int) -> torch.Tensor:
        """The transpose of the stride-1 map at `side`: its taps flipped (the map is symmetric:
        n reads m at tap k iff m reads n at tap K-1-k), built once per batch."""
        key = (side, kernel, "transposed")
        if key not in self._maps:
            self._maps[key] = self.neighbours(side, kernel, 1).flip(1).contiguous()
        return self._maps[key]

    def pixel_rows(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (P * 32 * 32, C): the visible pixels as rows, packed order."""
        return self.patches.visible_patches(imgs).permute(0, 2, 3, 1).reshape(-1, imgs.shape[1])

    def densify(self, rows: torch.Tensor, side: int) -> torch.Tensor:
        """(P * side**2, C) -> (N, C, h*side, w*side), zeros at removed sites."""
        pl = self.patches
        (h, w), n, c = pl.grid, pl.batch, rows.shape[1]
        sample, ys, xs = self._site_coords(side)
        flat = ((sample * h * side + ys) * w * side + xs).reshape(-1)
        out = rows.new_zeros(n * h * side * w * side, c).index_copy(0, flat, rows)
        return out.view(n, h * side, w * side, c).permute(0, 3, 1, 2)


class ResNetRowEncoder:
    """One forward of a dense `ResNet` over the packed rows of `layout`."""

    def __init__(self, encoder: ResNet, layout: ResNetLayout):
        self.encoder, self.layout = encoder, layout

    def run(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        enc, layout = self.encoder, self.layout
        x, side = self.conv(enc.conv1, layout.pixel_rows(imgs), PATCH)
        x = enc.act1(batch_norm_rows(enc.bn1, x))
        x, side = self.max_pool(enc.maxpool, x, side)
        features = []
        for layer in enc.layers():
            for block in layer:
                x, side = self.block(block, x, side)
            features.append(layout.densify(x, side))
        return features

    def conv(self, conv, x: torch.Tensor, side: int) -> tuple[torch.Tensor, int]:
        """A bias-free conv (padding k // 2) on rows at `side` -> (rows, the output's side)."""
        (k, _), (stride, _) = conv.kernel_size, conv.stride
        if is_pointwise(conv):
            return F.linear(x, conv.weight.flatten(1)), side
        nbr = self.layout.neighbours(side, k, stride)
        transposed = self.layout.submanifold_transpose(side, k) if stride == 1 else None
        return gather_conv(x, nbr, conv.weight, transposed), side // stride

    def max_pool(self, pool, x: torch.Tensor, side: int) -> tuple[torch.Tensor, int]:
        """Max over the visible taps (each output's own window holds at least one: its site t*y)."""
        nbr = self.layout.neighbours(side, pool.kernel_size, pool.stride)
        padded = torch.cat([x, x.new_full((1, x.shape[1]), float("-inf"))])
        index = torch.where(nbr < 0, x.shape[0], nbr).reshape(-1).long()
        windows = padded.index_select(0, index).view(*nbr.shape, x.shape[1])
        return windows.max(dim=1).values, side // pool.stride

    def block(self, block, x: torch.Tensor, side: int) -> tuple[torch.Tensor, int]:
        shortcut = x
        if block.downsample is not None:
            conv, bn = block.downsample
            shortcut = batch_norm_rows(bn, self.conv(conv, x, side)[0])
        *inner, (conv, bn, act) = block.branch()
        for inner_conv, inner_bn, inner_act in inner:
            x, side = self.conv(inner_conv, x, side)
            x = inner_act(batch_norm_rows(inner_bn, x))
        x, side = self.conv(conv, x, side)
        return act(batch_norm_rows(bn, x) + shortcut), side
