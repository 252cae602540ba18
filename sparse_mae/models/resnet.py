"""ResNet (He et al., arXiv 1512.03385) in timm's exact parameter layout: the dense classifier
and the encoder SparK pretrains (sparse_mae/models/spark.py).

Parameter layout (timm's `resnet*`, torchvision's v1.5: the stride of a Bottleneck sits on
its 3x3 conv):

    conv1.weight                                Conv2d(in_chans, 64, 7, stride 2, pad 3, no bias)
    bn1.{weight,bias,running_mean,running_var,num_batches_tracked}
    layer{i}.{j}.conv1.weight, bn1.*            BasicBlock: 3x3 (stride); Bottleneck: 1x1
    layer{i}.{j}.conv2.weight, bn2.*            BasicBlock: 3x3; Bottleneck: 3x3 (stride)
    layer{i}.{j}.conv3.weight, bn3.*            Bottleneck only: 1x1 to 4x the width
    layer{i}.{j}.downsample.0.weight            Conv2d 1x1 (the block's stride), where the shape changes
    layer{i}.{j}.downsample.1.*                 BatchNorm2d
    fc.{weight,bias}                            classifier only (num_classes > 0)

The geometry is stated here, as geometry.py states ConvNeXt's: conv1 (/2) and the 3x3/2
max-pool (/4) make the stem; layer1..4 have strides 1, 2, 2, 2, so their outputs sit at
/4, /8, /16, /32: geometry.STAGE_STRIDES, the same stage grids as ConvNeXt's (checked at
import), the last one the 32x32 masking patch (geometry.PATCH).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sparse_mae.models.geometry import NUM_STAGES, STAGE_STRIDES
from sparse_mae.models.convnextv2 import check_images  # the input rules (patch multiples) are the same

# -- geometry ----------------------------------------------------------------------------

STEM_WIDTH = 64
CONV1_KERNEL, CONV1_STRIDE = 7, 2  # conv1: 7x7, stride 2, padding 3 -> /2
POOL_KERNEL, POOL_STRIDE = 3, 2  # maxpool: 3x3, stride 2, padding 1 -> /4
LAYER_STRIDES = (1, 2, 2, 2)  # the first block of each layer; on its 3x3 conv and its downsample
STAGE_WIDTHS = (64, 128, 256, 512)  # the 3x3 convs' width per layer (x expansion at a layer's output)
BN_EPS = 1e-5  # timm's / torch's BatchNorm2d default


def _layer_grid_strides() -> tuple[int, ...]:
    strides, s = [], CONV1_STRIDE * POOL_STRIDE
    for layer_stride in LAYER_STRIDES:
        s *= layer_stride
        strides.append(s)
    return tuple(strides)


# layer1..4 sit on the stage grids of ConvNeXt's stages, (4, 8, 16, 32), whose last is the
# 32x32 masking patch: masks, data pipeline, configs and the packed layouts share them
if len(LAYER_STRIDES) != NUM_STAGES or _layer_grid_strides() != STAGE_STRIDES:
    raise ImportError(f"ResNet's layer grids {_layer_grid_strides()} differ from the stage grids {STAGE_STRIDES}")


# -- blocks ------------------------------------------------------------------------------

def _downsample(in_chs: int, out_chs: int, stride: int) -> nn.Sequential | None:
    """1x1 conv (stride) + BN on the shortcut where the block changes shape; else None."""
    if stride == 1 and in_chs == out_chs:
        return None
    return nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs, eps=BN_EPS))


def is_pointwise(conv: nn.Conv2d) -> bool:
    """A 1x1 stride-1 conv: a matmul on each site's channels (the sparse engines run it on the
    rows; every other conv reads neighbours)."""
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1)


class BasicBlock(nn.Module):
    """3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs, eps=BN_EPS)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride)
        self.stride = stride

    def branch(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU]]:
        """(conv, BN, ReLU) of the residual branch in order, for the sparse backends; the
        last ReLU follows the sum with the shortcut."""
        return [(self.conv1, self.bn1, self.act1), (self.conv2, self.bn2, self.act2)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (4x) -> BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(in_chs, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs, eps=BN_EPS)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_chs, out_chs, stride)
        self.stride = stride

    def branch(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, nn.ReLU]]:
        """(conv, BN, ReLU) of the residual branch in order, for the sparse backends; the
        last ReLU follows the sum with the shortcut."""
        return [(self.conv1, self.bn1, self.act1), (self.conv2, self.bn2, self.act2), (self.conv3, self.bn3, self.act3)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.act3(x + shortcut)


# -- the network -------------------------------------------------------------------------

@dataclass(frozen=True)
class VariantSpec:
    block: type[BasicBlock] | type[Bottleneck]
    depths: tuple[int, int, int, int]
    widths: tuple[int, int, int, int] = STAGE_WIDTHS
    stem_width: int = STEM_WIDTH


VARIANTS: dict[str, VariantSpec] = {
    # `resnet_debug` is ours: a very small bottleneck ResNet for fast tests, not a paper variant.
    "resnet_debug": VariantSpec(Bottleneck, (1, 1, 1, 1), (8, 8, 16, 16), stem_width=8),
    "resnet18": VariantSpec(BasicBlock, (2, 2, 2, 2)),
    "resnet34": VariantSpec(BasicBlock, (3, 4, 6, 3)),
    "resnet50": VariantSpec(Bottleneck, (3, 4, 6, 3)),
    "resnet101": VariantSpec(Bottleneck, (3, 4, 23, 3)),
    "resnet152": VariantSpec(Bottleneck, (3, 8, 36, 3)),
}


class ResNet(nn.Module):
    """Dense ResNet. With num_classes=0 it is the bare encoder (no `fc`)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck] = Bottleneck,
        depths=(3, 4, 6, 3),
        widths=STAGE_WIDTHS,
        stem_width: int = STEM_WIDTH,
        in_chans: int = 3,
        num_classes: int = 1000,
        zero_init_last: bool = True,
    ):
        super().__init__()
        if len(depths) != NUM_STAGES or len(widths) != NUM_STAGES:
            raise ValueError(f"depths and widths need {NUM_STAGES} entries each, got {depths} and {widths}")
        self.block, self.depths, self.widths = block, tuple(depths), tuple(widths)
        self.in_chans, self.num_classes = in_chans, num_classes
        self.conv1 = nn.Conv2d(in_chans, stem_width, CONV1_KERNEL, stride=CONV1_STRIDE, padding=CONV1_KERNEL // 2,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width, eps=BN_EPS)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(POOL_KERNEL, stride=POOL_STRIDE, padding=POOL_KERNEL // 2)
        in_chs = stem_width
        for i, (depth, width, stride) in enumerate(zip(depths, widths, LAYER_STRIDES)):
            blocks = []
            for j in range(depth):
                blocks.append(block(in_chs, width, stride if j == 0 else 1))
                in_chs = width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else None
        self.init_weights(zero_init_last)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """Channels of layer1..4's outputs."""
        return tuple(w * self.block.expansion for w in self.widths)

    @property
    def num_features(self) -> int:
        return self.stage_dims[-1]

    def layers(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def convs(self) -> list[tuple[nn.Conv2d, int]]:
        """Every conv in forward order with its input's stride in pixels (conv1's 1, layer1's 4):
        the one walk the FLOP counter and the native engine's kernel count share."""
        found, stride = [(self.conv1, 1)], self.conv1.stride[0] * self.maxpool.stride
        for layer in self.layers():
            for block in layer:
                block_in = stride
                for conv, _, _ in block.branch():
                    found.append((conv, stride))
                    stride *= conv.stride[0]
                if block.downsample is not None:
                    found.append((block.downsample[0], block_in))
        return found

    def init_weights(self, zero_init_last: bool) -> None:
        # timm's: He-normal (fan out) convs, BN at (1, 0), and the last BN of each residual
        # branch at 0 so that every block starts as the identity
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.branch()[-1][1].weight)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, stem_width, H/4, W/4)."""
        return self.maxpool(self.act1(self.bn1(self.conv1(x))))

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, in_chans, H, W) -> layer1..4's outputs, (N, stage_dims[i], H/STAGE_STRIDES[i], W/...)."""
        check_images(x, self.in_chans)
        x = self.forward_stem(x)
        features = []
        for layer in self.layers():
            x = layer(x)
            features.append(x)
        return features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_features, H/32, W/32)."""
        return self.forward_stages(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.fc is None:
            return x
        return self.fc(x.mean(dim=(2, 3)))


def build_resnet(variant: str, **kwargs) -> ResNet:
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {variant!r}; valid: {', '.join(VARIANTS)}")
    spec = VARIANTS[variant]
    return ResNet(spec.block, spec.depths, spec.widths, spec.stem_width, **kwargs)
