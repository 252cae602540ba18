"""ConvNeXt V2 (arXiv 2301.00808): the dense classifier and the encoder the backends run.

Canonical parameter layout (every backend and every checkpoint we write uses it):

    stem.0.{weight,bias}                       Conv2d(in_chans, C0, 4, 4)
    stem.1.{weight,bias}                       LayerNorm over channels
    stages.{i}.downsample.0.{weight,bias}      LayerNorm (stages 1..3 only)
    stages.{i}.downsample.1.{weight,bias}      Conv2d(C_{i-1}, C_i, 2, 2)
    stages.{i}.blocks.{j}.conv_dw.{weight,bias}    Conv2d(C, C, 7, pad 3, groups=C)
    stages.{i}.blocks.{j}.norm.{weight,bias}       LayerNorm(C)
    stages.{i}.blocks.{j}.mlp.fc1.{weight,bias}    Linear(C, 4C): weight (4C, C)
    stages.{i}.blocks.{j}.mlp.grn.{weight,bias}    GRN gamma / beta, (4C,)
    stages.{i}.blocks.{j}.mlp.fc2.{weight,bias}    Linear(4C, C)
    head.norm.{weight,bias}, head.fc.{weight,bias} classifier only

This is timm's naming with Linear MLP weights for every variant (timm itself stores
atto..nano as 1x1 convs; the export app reshapes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_mae.models.geometry import (  # the architecture's facts, each defined there once
    DOWNSAMPLE_STRIDE, GRN_EPS, KERNEL_SIZE, LN_EPS, NUM_STAGES, PATCH, STEM_STRIDE,
)


@dataclass(frozen=True)
class VariantSpec:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]


VARIANTS: dict[str, VariantSpec] = {
    # `debug` is ours: a very small model for fast tests, not a paper variant.
    "debug": VariantSpec((1, 1, 2, 1), (8, 16, 24, 32)),
    "atto": VariantSpec((2, 2, 6, 2), (40, 80, 160, 320)),
    "femto": VariantSpec((2, 2, 6, 2), (48, 96, 192, 384)),
    "pico": VariantSpec((2, 2, 6, 2), (64, 128, 256, 512)),
    "nano": VariantSpec((2, 2, 8, 2), (80, 160, 320, 640)),
    "tiny": VariantSpec((3, 3, 9, 3), (96, 192, 384, 768)),
    "base": VariantSpec((3, 3, 27, 3), (128, 256, 512, 1024)),
    "large": VariantSpec((3, 3, 27, 3), (192, 384, 768, 1536)),
    "huge": VariantSpec((3, 3, 27, 3), (352, 704, 1408, 2816)),
}


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel dim of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization over an NHWC map.

    out = gamma * (x * Nx) + beta + x, with Gx the L2 norm over (H, W) per sample and
    channel and Nx = Gx / (mean_c Gx + eps). gamma, beta start at 0 (identity).
    """

    def __init__(self, dim: int, eps: float = GRN_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps  # read by every backend, as nn.LayerNorm's eps is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + self.eps)
        return x + self.bias + self.weight * (x * nx)


class Mlp(nn.Module):
    """Linear(C, 4C) -> GELU -> GRN(4C) -> Linear(4C, C), on channels-last input."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GRN(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.grn(self.act(self.fc1(x))))


def drop_path_scale(batch: int, drop_prob: float, training: bool, device, dtype) -> torch.Tensor | None:
    """Per-sample stochastic-depth multiplier (N,), or None when it is the identity.

    Every backend draws it through this one function, once per block and in the same
    order, so equal RNG states give equal drops in every backend.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep = 1.0 - drop_prob
    return torch.empty(batch, device=device, dtype=dtype).bernoulli_(keep).div_(keep)


class Block(nn.Module):
    """depthwise 7x7 -> LayerNorm -> Mlp -> drop path -> residual (no LayerScale)."""

    def __init__(self, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=KERNEL_SIZE, padding=KERNEL_SIZE // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, 4 * dim)
        self.drop_path = drop_path

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch, NCHW in and out."""
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x))
        return x.permute(0, 3, 1, 2)

    def drop_path_scale(self, batch: int, device, dtype) -> torch.Tensor | None:
        """This block's per-sample stochastic-depth multiplier (N,), or None (identity). Every
        backend draws it through here, once per block and in the same order, so equal RNG
        states give equal drops in every backend."""
        return drop_path_scale(batch, self.drop_path, self.training, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        scale = self.drop_path_scale(x.shape[0], x.device, x.dtype)
        if scale is not None:
            y = y * scale.view(-1, 1, 1, 1)
        return x + y

    def extra_repr(self) -> str:
        return f"drop_path={self.drop_path}"


class Stage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], first: bool):
        super().__init__()
        if first:
            self.downsample = nn.Identity()
        else:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_dim, eps=LN_EPS),
                nn.Conv2d(in_dim, dim, kernel_size=DOWNSAMPLE_STRIDE, stride=DOWNSAMPLE_STRIDE),
            )
        self.blocks = nn.Sequential(*[Block(dim, drop_paths[j]) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ClassifierHead(nn.Module):
    """global average pool -> LayerNorm -> Linear."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class ConvNeXtV2(nn.Module):
    """Dense ConvNeXt V2. With num_classes=0 it is the bare encoder (no `head.*`)."""

    def __init__(
        self,
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_path_rate: float = 0.0,
        head_init_scale: float = 1.0,
    ):
        super().__init__()
        if len(depths) != NUM_STAGES or len(dims) != NUM_STAGES:
            raise ValueError(f"depths and dims need {NUM_STAGES} entries each, got {depths} and {dims}")
        self.depths, self.dims, self.in_chans = tuple(depths), tuple(dims), in_chans
        self.num_classes = num_classes
        self.stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], kernel_size=STEM_STRIDE, stride=STEM_STRIDE),
                                  LayerNorm2d(dims[0], eps=LN_EPS))
        total = sum(depths)  # linear stochastic-depth decay, computed in Python (meta-device safe)
        rates = [drop_path_rate * k / max(1, total - 1) for k in range(total)]
        self.stages = nn.ModuleList()
        start = 0
        for i in range(NUM_STAGES):
            in_dim = dims[i - 1] if i > 0 else dims[0]
            self.stages.append(Stage(in_dim, dims[i], depths[i], rates[start : start + depths[i]], first=i == 0))
            start += depths[i]
        self.head = ClassifierHead(dims[-1], num_classes) if num_classes > 0 else None
        self.apply(init_weights)
        if self.head is not None:
            self.head.fc.weight.data.mul_(head_init_scale)
            self.head.fc.bias.data.mul_(head_init_scale)

    @property
    def num_features(self) -> int:
        return self.dims[-1]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, C3, H/32, W/32)."""
        check_images(x, self.in_chans)
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        if self.head is None:
            return x
        return self.head(x)


def init_weights(module: nn.Module) -> None:
    # std 0.02 everywhere, as ConvNeXt does (the official FCMAE code uses timm's default 1.0).
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def check_images(x: torch.Tensor, in_chans: int) -> None:
    """Clear errors for input that the encoder cannot take."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (N, {in_chans}, H, W), got {shape}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)}); "
            f"convert images to {in_chans} channels or build the model with in_chans={x.shape[1]}"
        )
    h, w = x.shape[-2:]
    if h % PATCH or w % PATCH or h == 0 or w == 0:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of {PATCH}; resize or crop to a multiple of "
            f"{PATCH} (e.g. {max(PATCH, h // PATCH * PATCH)}x{max(PATCH, w // PATCH * PATCH)})"
        )


def build_convnextv2(variant: str, **kwargs) -> ConvNeXtV2:
    spec = VARIANTS[variant]
    return ConvNeXtV2(depths=spec.depths, dims=spec.dims, **kwargs)


# -- layer-wise lr decay groups (fine-tuning) -------------------------------------------

NUM_LAYER_IDS = 12  # ConvNeXt's layer-decay grouping: stem 0, stages 1..12, head 13


def layer_id(name: str) -> int:
    """Layer-decay group of a classifier parameter, as the ConvNeXt (V2) fine-tuning code groups
    them: stem 0; stages 0-1 and downsamples 1-2 -> stage+1; stage 2 blocks in threes -> 3..11;
    stage 3 and its downsample -> 12; head 13."""
    if name.startswith("stem."):
        return 0
    if m := re.match(r"stages\.(\d+)\.downsample\.", name):
        i = int(m[1])
        return i + 1 if i < 3 else NUM_LAYER_IDS
    if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name):
        i, j = int(m[1]), int(m[2])
        if i < 2:
            return i + 1
        if i == 2:
            return min(3 + j // 3, NUM_LAYER_IDS - 1)
        return NUM_LAYER_IDS
    return NUM_LAYER_IDS + 1  # head
