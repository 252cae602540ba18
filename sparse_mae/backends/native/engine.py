"""Native sparse encoder: every op runs on the visible patches only (see layout.py).

Two paths, one result (equal to the dense_masked reference):

- Packed rows (C kernels on CPU, Triton on CUDA; `sparse_mae_kernels.ops.rows_*`). The
  features of a stage are rows (M, C), one per visible site. Stem = the 4x4/4 conv as
  one matmul over the visible windows, then LayerNorm; downsample = LayerNorm writing
  its rows in 2x2-window order, then the 2x2/2 conv as one matmul (a reshape, no copy);
  block = depthwise 7x7 with its LayerNorm as the epilogue (one kernel), Linear as a bare
  matmul, its bias + GELU + GRN (per sample) in one kernel, Linear as a bare matmul, its
  bias + drop path + residual in one kernel. Under autocast every activation stays in
  the autocast dtype between the ops (no casts around the kernels); parameters are read
  in float32 by the kernels, cast by autocast for the matmuls.
- Patch tiles (torch ops, `sparse_mae_kernels.ops.tiles_*`): the fallback where no kernel
  runs (SPARSE_MAE_CPU_KERNELS=0 / SPARSE_MAE_TRITON=0, no compiler, no Triton): tiles
  (P, s, s, C), halo-tile depthwise conv, LayerNorm / Linear / GELU as torch ops, GRN
  over each sample's tiles.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

import sparse_mae_kernels
from sparse_mae.backends.base import EncoderBackend
from sparse_mae.backends.native.layout import SparseLayout, StageLayout
from sparse_mae.backends.native.resnet import ResNetLayout, ResNetRowEncoder, kernel_conv_macs
from sparse_mae.models.resnet import ResNet
from sparse_mae.models.geometry import KERNEL_SIZE, PATCH, STAGE_SITES_PER_PATCH, STAGE_UPSAMPLE
from sparse_mae_kernels import constants as kernel_constants
from sparse_mae_kernels.constants import TAPS
from sparse_mae_kernels.ops.rows_dwconv_layernorm import rows_dwconv_layernorm
from sparse_mae_kernels.ops.rows_grn import rows_grn
from sparse_mae_kernels.ops.rows_layernorm import rows_layernorm
from sparse_mae_kernels.ops.rows_residual import rows_residual
from sparse_mae_kernels.ops.tiles_dwconv import tiles_dwconv
from sparse_mae_kernels.ops.tiles_grn import tiles_grn

if TYPE_CHECKING:
    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2

# The kernels are compiled for one depthwise size (theirs); the model states its own.
if kernel_constants.KERNEL_SIZE != KERNEL_SIZE:
    raise ImportError(f"sparse_mae_kernels is built for {kernel_constants.KERNEL_SIZE}x{kernel_constants.KERNEL_SIZE} "
                      f"depthwise convs, the model's are {KERNEL_SIZE}x{KERNEL_SIZE}")


class NativeBackend(EncoderBackend):
    name = "native"
    autocast_devices = ("cpu", "cuda")

    def encode(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, _, h, w = imgs.shape
        if tuple(mask.shape) != (n, h // PATCH, w // PATCH):
            raise ValueError(f"mask must be (N, H/32, W/32) = {(n, h // PATCH, w // PATCH)}, got {tuple(mask.shape)}")
        layout = SparseLayout(mask.to(imgs.device))
        impl = sparse_mae_kernels.row_impl(imgs.device)
        if impl is not None:
            return RowEncoder(encoder, layout, impl).run(imgs)
        return TileEncoder(encoder, layout).run(imgs)

    def encode_stages(self, encoder: ResNet, imgs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """SparK's ResNet on packed rows (resnet.py): the gather convs in C / Triton where they
        run, every other op a torch op, on any device."""
        n, _, h, w = imgs.shape
        if tuple(mask.shape) != (n, h // PATCH, w // PATCH):
            raise ValueError(f"mask must be (N, H/32, W/32) = {(n, h // PATCH, w // PATCH)}, got {tuple(mask.shape)}")
        return ResNetRowEncoder(encoder, ResNetLayout(mask.to(imgs.device))).run(imgs)

    def decode_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        """The decoder's blocks as packed rows with every site present, through the encoder's
        fused row kernels (depthwise conv + LayerNorm, GRN with GELU and fc1's bias, residual
        with fc2's bias): no NCHW <-> NHWC permutes and no separate elementwise passes."""
        impl = sparse_mae_kernels.row_impl(x.device)
        if impl is None or len(blocks) == 0:
            return super().decode_blocks(blocks, x)
        n, c, h, w = x.shape
        every_site = SparseLayout(torch.zeros(n, h, w, device=x.device))
        rows_engine = RowEncoder(None, every_site, impl)
        st = every_site.stage(len(STAGE_UPSAMPLE) - 1)  # one site per patch: the decoder's own grid
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # packed row order = (sample, y, x)
        for block in blocks:
            rows = rows_engine.block(block, rows, st)
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)

    def uncounted_decode_macs(self, blocks, x: torch.Tensor) -> int:
        if sparse_mae_kernels.row_impl(x.device) is None:
            return 0
        n, c, h, w = x.shape
        return len(blocks) * n * h * w * TAPS * c

    def uncounted_macs(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """The depthwise convs in C or Triton are invisible to FlopCounterMode; torch ops are not.
        A ResNet's: its gather convs where the kernel runs them."""
        if isinstance(encoder, ResNet):
            return kernel_conv_macs(encoder, imgs, mask)
        if sparse_mae_kernels.row_impl(imgs.device) is None:
            return 0
        visible = int((mask == 0).sum())
        return sum(
            depth * visible * STAGE_SITES_PER_PATCH[i] * TAPS * dim
            for i, (depth, dim) in enumerate(zip(encoder.depths, encoder.dims))
        )



def _check_gelu(act: nn.Module) -> None:
    # the GRN kernel's prologue is the exact (erf) GELU of nn.GELU()
    if not isinstance(act, nn.GELU) or act.approximate != "none":
        raise ValueError(f"the native engine's fused MLP needs nn.GELU() (exact), got {act}")


class RowEncoder:
    """The packed-row path: features (M, C) per stage, the kernels of sparse_mae_kernels.ops."""

    def __init__(self, encoder: ConvNeXtV2, layout: SparseLayout, impl: str):
        self.encoder, self.layout, self.impl = encoder, layout, impl

    def run(self, imgs: torch.Tensor) -> torch.Tensor:
        enc, layout = self.encoder, self.layout
        x = self.stem(imgs)
        for i, stage in enumerate(enc.stages):
            if i > 0:
                x = self.downsample(stage.downsample, x, layout.stage(i - 1))
            st = layout.stage(i)
            for block in stage.blocks:
                x = self.block(block, x, st)
        return layout.densify(x.view(layout.num_patches, 1, 1, -1))

    def stem(self, imgs: torch.Tensor) -> torch.Tensor:
        """4x4/4 conv as one matmul over the visible windows, then LayerNorm -> (P*64, C0)."""
        conv, norm = self.encoder.stem
        windows = self.layout.stem_windows(imgs)
        x = F.linear(windows, conv.weight.reshape(conv.out_channels, -1), conv.bias)
        return rows_layernorm(x, norm.weight, norm.bias, norm.eps, impl=self.impl, check_values=False)

    def downsample(self, downsample, x: torch.Tensor, prev: StageLayout) -> torch.Tensor:
        """LayerNorm written in 2x2-window order, then the 2x2/2 conv as a matmul -> (M/4, C')."""
        norm, conv = downsample
        c = x.shape[1]
        x = rows_layernorm(x, norm.weight, norm.bias, norm.eps, out_rows=prev.window_rows(), impl=self.impl,
                           check_values=False)
        # each output site's window is one row (ky, kx, c), matching the conv weight's order
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
        return F.linear(x.view(-1, 4 * c), weight, conv.bias)

    def block(self, block: Block, x: torch.Tensor, st: StageLayout) -> torch.Tensor:
        conv, norm, mlp = block.conv_dw, block.norm, block.mlp
        _check_gelu(mlp.act)
        c = x.shape[1]
        z = rows_dwconv_layernorm(x, st.neighbour_map(), conv.weight.view(c, TAPS), conv.bias, norm.weight, norm.bias,
                                  norm.eps, impl=self.impl, check_values=False)
        # the Linears run as bare matmuls: fc1's bias is the GRN kernel's prologue, fc2's the residual's
        h = F.linear(z, mlp.fc1.weight)
        u = rows_grn(h, st.row_offsets, mlp.grn.weight, mlp.grn.bias, mlp.fc1.bias, gelu=True, eps=mlp.grn.eps,
                     impl=self.impl, check_values=False)
        y = F.linear(u, mlp.fc2.weight)
        scale = block.drop_path_scale(self.layout.batch, x.device, x.dtype)
        return rows_residual(x, y, mlp.fc2.bias, scale, st.row_offsets if scale is not None else None,
                             impl=self.impl, check_values=False)


class TileEncoder:
    """The torch fallback: features as patch tiles (P, s, s, C)."""

    def __init__(self, encoder: ConvNeXtV2, layout: SparseLayout):
        self.encoder, self.layout = encoder, layout

    def run(self, imgs: torch.Tensor) -> torch.Tensor:
        layout = self.layout
        x = self.stem(imgs)
        for i, stage in enumerate(self.encoder.stages):
            if i > 0:
                x = self.downsample(stage.downsample, x)
            st = layout.stage(i)
            for block in stage.blocks:
                x = self.block(block, x, st)
        return layout.densify(x)

    def stem(self, imgs: torch.Tensor) -> torch.Tensor:
        """-> (P, 8, 8, C0) tiles."""
        conv, norm = self.encoder.stem
        x = conv(self.layout.visible_patches(imgs)).permute(0, 2, 3, 1)
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    @staticmethod
    def downsample(downsample, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm then 2x2/2 conv: (P, s, s, C) -> (P, s/2, s/2, C')."""
        norm, conv = downsample
        p, s, _, c = x.shape
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        # each output site's 2x2 window as one row (ky, kx, c), matching the conv weight
        windows = x.reshape(p, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4 * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
        return F.linear(windows, weight, conv.bias).view(p, s // 2, s // 2, conv.out_channels)

    def block(self, block: Block, x: torch.Tensor, st: StageLayout) -> torch.Tensor:
        layout = self.layout
        p, s, _, c = x.shape
        conv = block.conv_dw
        y = tiles_dwconv(x, st.halo_index, conv.weight, conv.bias)
        mlp = block.mlp
        y = mlp.act(mlp.fc1(block.norm(y)))
        y = tiles_grn(y.reshape(p, s * s, -1), layout.patch_sample, layout.batch, mlp.grn.weight, mlp.grn.bias,
                      mlp.grn.eps)
        y = mlp.fc2(y).view(p, s, s, c)
        scale = block.drop_path_scale(layout.batch, x.device, x.dtype)
        if scale is not None:
            y = y * scale[layout.patch_sample].view(p, 1, 1, 1)
        return x + y
