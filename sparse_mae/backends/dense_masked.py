"""The reference backend: dense ops on a zero-filled map, mask re-applied before every
spatial op and every GRN. With patch-aligned masks it equals a true sparse encoder
(docs/design.md section 3); every other backend is tested against it."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sparse_mae.backends.base import EncoderBackend, upsample_mask
from sparse_mae.models.geometry import STAGE_UPSAMPLE

if TYPE_CHECKING:
    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2


class DenseMaskedBackend(EncoderBackend):
    name = "dense_masked"
    autocast_devices = ("cpu", "cuda")

    def encode(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = 1.0 - mask.to(imgs.dtype)
        # (N, 1, H_i, W_i) keep-maps of the four stages
        keeps = [upsample_mask(keep, f).unsqueeze(1) for f in STAGE_UPSAMPLE]
        x = encoder.stem(imgs) * keeps[0]
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                norm, conv = stage.downsample
                x = conv(norm(x) * keeps[i - 1]) * keeps[i]
            for block in stage.blocks:
                x = self._block(block, x, keeps[i])
        return x

    @staticmethod
    def _block(block: Block, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W), zero at removed sites -> same."""
        y = block.conv_dw(x).permute(0, 2, 3, 1)
        mlp = block.mlp
        y = mlp.act(mlp.fc1(block.norm(y)))
        y = mlp.grn(y * keep.permute(0, 2, 3, 1))  # GRN's norm over visible sites only
        y = mlp.fc2(y).permute(0, 3, 1, 2)
        scale = block.drop_path_scale(x.shape[0], x.device, x.dtype)
        if scale is not None:
            y = y * scale.view(-1, 1, 1, 1)
        return (x + y) * keep
