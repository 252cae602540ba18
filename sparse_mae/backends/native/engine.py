"""Native sparse encoder: every op runs on the visible patches only (see layout.py).

Per op: stem = 4x4/4 conv on the visible image patches; downsample = LayerNorm, then the
2x2/2 conv as one matmul (its windows never cross a patch border, so it is a reshape,
no gather); block = submanifold depthwise 7x7, LayerNorm / Linear / GELU on packed rows,
GRN per sample over its visible sites, drop path per sample.

The depthwise conv runs as a gather kernel over the stage's neighbour map: C on the CPU
(`sparse_mae_kernels.cpu_ops`), Triton on CUDA (`triton_ops`, which also runs the GRN).
Each is switched off by SPARSE_MAE_CPU_KERNELS=0 / SPARSE_MAE_TRITON=0, and where neither
runs the torch ops of `sparse_ops` take over (halo tiles for the conv). The result
equals the dense_masked reference in every case.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import sparse_mae_kernels
from sparse_mae.backends.base import EncoderBackend
from sparse_mae.backends.native.layout import SparseLayout, StageLayout
from sparse_mae.flops import STAGE_SITES_PER_PATCH
from sparse_mae.models.convnextv2 import PATCH, Block, ConvNeXtV2, drop_path_scale
from sparse_mae_kernels.sparse_ops import segment_grn, tile_dwconv


class NativeBackend(EncoderBackend):
    name = "native"
    autocast_devices = ("cpu", "cuda")

    def encode(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, _, h, w = imgs.shape
        if tuple(mask.shape) != (n, h // PATCH, w // PATCH):
            raise ValueError(f"mask must be (N, H/32, W/32) = {(n, h // PATCH, w // PATCH)}, got {tuple(mask.shape)}")
        layout = SparseLayout(mask.to(imgs.device))
        kernels = _row_kernels(imgs.device)
        x = self._stem(encoder, imgs, layout)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                x = self._downsample(stage.downsample, x)
            stage_layout = layout.stage(i)
            for block in stage.blocks:
                x = self._block(block, x, layout, stage_layout, kernels)
        return layout.densify(x)

    def uncounted_macs(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """The depthwise convs in C or Triton are invisible to FlopCounterMode; torch ops are not."""
        if _row_kernels(imgs.device).dwconv is None:
            return 0
        visible = int((mask == 0).sum())
        return sum(
            depth * visible * STAGE_SITES_PER_PATCH[i] * 49 * dim
            for i, (depth, dim) in enumerate(zip(encoder.depths, encoder.dims))
        )

    @staticmethod
    def _stem(encoder: ConvNeXtV2, imgs: torch.Tensor, layout: SparseLayout) -> torch.Tensor:
        """-> (P, 8, 8, C0) tiles."""
        conv, norm = encoder.stem
        x = conv(layout.visible_patches(imgs)).permute(0, 2, 3, 1)
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    @staticmethod
    def _downsample(downsample, x: torch.Tensor) -> torch.Tensor:
        """LayerNorm then 2x2/2 conv: (P, s, s, C) -> (P, s/2, s/2, C')."""
        norm, conv = downsample
        p, s, _, c = x.shape
        x = F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        # each output site's 2x2 window as one row (ky, kx, c), matching the conv weight
        windows = x.reshape(p, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4 * c)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(conv.out_channels, 4 * c)
        return F.linear(windows, weight, conv.bias).view(p, s // 2, s // 2, conv.out_channels)

    @staticmethod
    def _block(block: Block, x: torch.Tensor, layout: SparseLayout, st: StageLayout, kernels: RowKernels) -> torch.Tensor:
        p, s, _, c = x.shape
        conv = block.conv_dw
        if kernels.dwconv is not None:
            y = kernels.dwconv(x.reshape(-1, c), st.neighbour_map(), conv.weight.view(c, -1), conv.bias)
            y = y.view(p, s, s, c)
        else:
            y = tile_dwconv(x, st.halo_index, conv.weight, conv.bias)
        mlp = block.mlp
        y = mlp.act(mlp.fc1(block.norm(y)))
        hidden = y.shape[-1]
        if kernels.grn is not None:
            y = kernels.grn(y.reshape(-1, hidden), st.row_offsets, mlp.grn.weight, mlp.grn.bias)
        else:
            y = segment_grn(y.reshape(p, s * s, hidden), layout.patch_sample, layout.batch, mlp.grn.weight, mlp.grn.bias)
        y = mlp.fc2(y).view(p, s, s, c)
        scale = drop_path_scale(layout.batch, block.drop_path, block.training, x.device, x.dtype)
        if scale is not None:
            y = y * scale[layout.patch_sample].view(p, 1, 1, 1)
        return x + y


@dataclass(frozen=True)
class RowKernels:
    """Kernels on packed rows for one device; None where the engine's torch op runs instead."""

    dwconv: Callable | None = None  # (x (M, C), nbr (M, 49), weight (C, 49), bias) -> (M, C)
    grn: Callable | None = None  # (x (M, C), row_offsets (N+1,), gamma, beta) -> (M, C)


def _row_kernels(device: torch.device) -> RowKernels:
    """Triton on CUDA, C on the CPU, each when switched on and usable (sparse_mae_kernels)."""
    if sparse_mae_kernels.use_triton(device):
        from sparse_mae_kernels import triton_ops

        return RowKernels(dwconv=triton_ops.sparse_dwconv, grn=triton_ops.segment_grn)
    if sparse_mae_kernels.use_cpu_kernels(device):
        from sparse_mae_kernels import cpu_ops

        # the layout built the map from one set of sites: skip the symmetry check per call
        return RowKernels(dwconv=partial(cpu_ops.sparse_dwconv, check_values=False))
    return RowKernels()
