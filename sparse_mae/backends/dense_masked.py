"""The reference backend: dense ops on a zero-filled map, mask re-applied before every
spatial op and every GRN. With patch-aligned masks it equals a true sparse encoder
(docs/design.md section 3); every other backend is tested against it.

ResNets run SparK's way (arXiv 2301.03580, its encoder.py): the masked pixels are zeroed,
every conv's output is re-masked, BatchNorm normalises the visible sites only, and the
max-pool takes the maximum over visible sites (docs/design.md section 7)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from sparse_mae.backends.base import EncoderBackend, upsample_mask
from sparse_mae.models.geometry import PATCH, STAGE_UPSAMPLE
from sparse_mae.models.sparse_norm import visible_batch_norm

if TYPE_CHECKING:
    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2
    from sparse_mae.models.resnet import ResNet


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

    # -- ResNet (SparK) --------------------------------------------------------------------

    def encode_stages(self, encoder: ResNet, imgs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        keeps = KeepMaps(mask, imgs.shape[-2])
        x = keeps.apply(imgs)
        x = keeps.apply(encoder.conv1(x))
        x = encoder.act1(masked_batch_norm(encoder.bn1, x, keeps))
        x = masked_max_pool(encoder.maxpool, x, keeps)
        features = []
        for layer in encoder.layers():
            for block in layer:
                x = self._resnet_block(block, x, keeps)
            features.append(x)
        return features

    @staticmethod
    def _resnet_block(block, x: torch.Tensor, keeps: KeepMaps) -> torch.Tensor:
        """BasicBlock or Bottleneck on a map zero at removed sites -> the same."""
        shortcut = x
        if block.downsample is not None:
            conv, bn = block.downsample
            shortcut = masked_batch_norm(bn, keeps.apply(conv(x)), keeps)
        *inner, (conv, bn, act) = block.branch()
        for inner_conv, inner_bn, inner_act in inner:
            x = inner_act(masked_batch_norm(inner_bn, keeps.apply(inner_conv(x)), keeps))
        x = masked_batch_norm(bn, keeps.apply(conv(x)), keeps)
        return act(x + shortcut)


class KeepMaps:
    """(N, 1, H/s, W/s) keep-maps (1 = visible) of one patch mask, at every grid the encoder
    reaches, looked up by a feature map's height (H/s differs for every s <= 32)."""

    def __init__(self, mask: torch.Tensor, height: int):
        self.keep = 1.0 - mask.float()
        self.height = height
        self._maps: dict[int, torch.Tensor] = {}

    def __getitem__(self, h: int) -> torch.Tensor:
        if h not in self._maps:
            factor = h * PATCH // self.height  # sites per patch side at this grid
            self._maps[h] = upsample_mask(self.keep, factor).unsqueeze(1)
        return self._maps[h]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x zeroed at removed sites (SparK re-masks every conv's output)."""
        return x * self[x.shape[-2]].to(x.dtype)


def masked_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, keeps: KeepMaps) -> torch.Tensor:
    """SparK's SparseBatchNorm2d: BatchNorm over the visible sites, zeros elsewhere."""
    return visible_batch_norm(bn, x, keeps[x.shape[-2]][:, 0].bool())


def masked_max_pool(pool: nn.MaxPool2d, x: torch.Tensor, keeps: KeepMaps) -> torch.Tensor:
    """Max over the visible sites of each window (removed sites count as the dtype's lowest
    value, not 0), zero at removed outputs. Every visible output's window holds a visible site
    (docs/design.md section 7). Not -inf: torch.compile's max-pool gives a window of -inf only
    (a removed output) the index of its padding, and the backward's scatter then fails."""
    visible = keeps[x.shape[-2]].bool()
    y = pool(x.masked_fill(~visible, torch.finfo(x.dtype).min))
    return y.masked_fill(~keeps[y.shape[-2]].bool(), 0.0)
