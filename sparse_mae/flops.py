"""FLOP accounting in MACs (multiply-accumulates), as the paper's GFLOPs column.

Two ways, which agree on dense models (a test checks it):
- `measured_gmacs`: torch's FlopCounterMode over a real forward (on the meta device, so
  even `huge` costs no memory); it counts convs and matmuls at 2 FLOPs per MAC.
- analytic per-patch costs: because masks are patch-aligned, every visible 32x32 patch
  costs the encoder exactly the same, so the useful sparse work is
  `visible_patches * encoder_macs_per_patch`.
Norms, GELU and GRN are not counted (neither by the paper nor by FlopCounterMode).

ResNets (SparK) the same way: every layer maps visible patches to visible patches
(docs/design.md section 7), so each conv costs, per visible patch, its output sites in the
patch x kernel taps x input x output channels; the max-pool counts none. SparK's decoder
(densify projections and the UNet blocks) is dense and costs the same at any mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_mae.models.convnextv2 import VARIANTS
from sparse_mae.models.geometry import (
    DOWNSAMPLE_STRIDE, KERNEL_SIZE, NUM_STAGES, PATCH, STAGE_SITES_PER_PATCH, STEM_STRIDE, visible_count,
)
from sparse_mae.models.resnet import ResNet


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measured_gmacs(model: torch.nn.Module, input_size=(224, 224), batch: int = 1, in_chans: int = 3,
                   **forward_kwargs) -> float:
    """GMACs of one forward at `input_size`, per image, counted by FlopCounterMode."""
    device = next(model.parameters()).device
    x = torch.zeros(batch, in_chans, *input_size, device=device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, **forward_kwargs)
    return counter.get_total_flops() / 2 / batch / 1e9


def block_macs_per_site(dim: int) -> int:
    """depthwise 7x7 + Linear(C, 4C) + Linear(4C, C)."""
    return KERNEL_SIZE * KERNEL_SIZE * dim + 8 * dim * dim


def encoder_macs_per_patch(depths, dims, in_chans: int = 3) -> int:
    """Encoder MACs for one visible 32x32 patch (stem, downsamples, blocks)."""
    macs = STAGE_SITES_PER_PATCH[0] * (in_chans * STEM_STRIDE**2) * dims[0]  # stem 4x4/4 conv
    for i in range(NUM_STAGES):
        sites = STAGE_SITES_PER_PATCH[i]
        if i > 0:
            macs += sites * DOWNSAMPLE_STRIDE**2 * dims[i - 1] * dims[i]  # 2x2/2 downsample conv
        macs += depths[i] * sites * block_macs_per_site(dims[i])
    return macs


def decoder_macs(patches: float, removed: float, encoder_dim: int, decoder_dim: int = 512, decoder_depth: int = 1,
                 in_chans: int = 3) -> float:
    """proj 1x1 + decoder blocks over every patch (the decoder is dense), pred 1x1 over the
    removed patches only (all the loss reads: FCMAE.forward(loss_only=True), as training runs)."""
    per_patch = encoder_dim * decoder_dim + decoder_depth * block_macs_per_site(decoder_dim)
    return patches * per_patch + removed * decoder_dim * PATCH * PATCH * in_chans


@dataclass(frozen=True)
class FcmaeGmacs:
    """Per-image GMACs of one pretraining forward (FCMAE's or SparK's)."""

    encoder_dense: float  # the encoder on every patch
    encoder_useful: float  # the encoder on the visible patches only
    decoder: float  # proj and blocks over all patches, pred over the removed ones (as training runs)

    @property
    def total_dense(self) -> float:
        return self.encoder_dense + self.decoder

    @property
    def total_useful(self) -> float:
        return self.encoder_useful + self.decoder


def _visible_patches(patches: int, mask: torch.Tensor | None, mask_ratio: float | None) -> float:
    """Visible patches per image: from `mask` (N, L) (1 = removed) when given, else from
    `mask_ratio` with the exact keep count the models draw (`visible_count`), else all."""
    if mask is not None:
        return float((mask == 0).sum()) / mask.shape[0]
    if mask_ratio is not None:
        return float(visible_count(patches, mask_ratio))
    return float(patches)


def conv_macs_per_patch(conv: torch.nn.Conv2d, in_stride: int) -> tuple[int, int]:
    """(MACs of `conv` for one 32x32 patch, its output's stride): output sites in the patch x
    kernel taps x input channels (per group) x output channels."""
    out_stride = in_stride * conv.stride[0]
    sites = (PATCH // out_stride) ** 2
    kh, kw = conv.kernel_size
    return sites * kh * kw * (conv.in_channels // conv.groups) * conv.out_channels, out_stride


def resnet_macs_per_patch(encoder: ResNet) -> int:
    """ResNet encoder MACs for one visible 32x32 patch (conv1, every block's convs and its
    downsample conv; the max-pool counts none)."""
    return sum(conv_macs_per_patch(conv, stride)[0] for conv, stride in encoder.convs())


def spark_decoder_macs(model, patches: float) -> float:
    """SparK's densify projections (at every site of their stage) and its light decoder (five
    x2 UNet blocks, the 1x1 to pixels), all dense: per image of `patches` patches."""
    macs = 0
    for i, proj in enumerate(model.densify_projs):  # coarsest first: (2^i)^2 sites per patch
        if isinstance(proj, torch.nn.Conv2d):
            macs += conv_macs_per_patch(proj, PATCH // 2**i)[0]
    stride = PATCH
    for block in model.decoder.dec:
        up = block.up_sample  # a transposed conv: each input site spreads kh*kw taps
        macs += (PATCH // stride) ** 2 * up.kernel_size[0] * up.kernel_size[1] * up.in_channels * up.out_channels
        stride //= up.stride[0]
        for layer in block.conv:
            if isinstance(layer, torch.nn.Conv2d):
                macs += conv_macs_per_patch(layer, stride)[0]
    macs += conv_macs_per_patch(model.decoder.proj, stride)[0]
    return patches * macs


def spark_gmacs(model, input_size=(224, 224), mask: torch.Tensor | None = None,
                mask_ratio: float | None = None) -> "FcmaeGmacs":
    """Per-image GMACs of one SparK forward (a SparK model, e.g. built on the meta device):
    encoder dense and on the visible patches only, decoder (dense)."""
    patches = (input_size[0] // PATCH) * (input_size[1] // PATCH)
    per_patch = resnet_macs_per_patch(model.encoder)
    return FcmaeGmacs(
        encoder_dense=patches * per_patch / 1e9,
        encoder_useful=_visible_patches(patches, mask, mask_ratio) * per_patch / 1e9,
        decoder=spark_decoder_macs(model, patches) / 1e9,
    )


def resnet_classifier_gmacs(model: ResNet, input_size=(224, 224)) -> float:
    patches = (input_size[0] // PATCH) * (input_size[1] // PATCH)
    head = model.fc.in_features * model.fc.out_features if model.fc is not None else 0
    return (patches * resnet_macs_per_patch(model) + head) / 1e9


def classifier_gmacs(variant: str, input_size=(224, 224), num_classes: int = 1000, in_chans: int = 3) -> float:
    spec = VARIANTS[variant]
    patches = (input_size[0] // PATCH) * (input_size[1] // PATCH)
    return (patches * encoder_macs_per_patch(spec.depths, spec.dims, in_chans) + spec.dims[-1] * num_classes) / 1e9


def fcmae_gmacs(
    variant_or_model,
    input_size=(224, 224),
    mask: torch.Tensor | None = None,
    mask_ratio: float | None = None,
    decoder_dim: int = 512,
    decoder_depth: int = 1,
    in_chans: int = 3,
) -> FcmaeGmacs:
    """Dense / useful-sparse encoder and decoder GMACs per image.

    The visible fraction comes from `mask` (N, L) (1 = removed) when given, otherwise
    from `mask_ratio` with the exact keep count FCMAE draws (`visible_count`), otherwise
    every patch is visible. A model (FCMAE) may stand in for the variant name; its own decoder sizes are used.
    """
    if isinstance(variant_or_model, str):
        spec = VARIANTS[variant_or_model]
        depths, dims = spec.depths, spec.dims
    else:
        enc = variant_or_model.encoder
        depths, dims, in_chans = enc.depths, enc.dims, enc.in_chans
        decoder_dim = variant_or_model.proj.out_channels
        decoder_depth = len(variant_or_model.decoder)
    patches = (input_size[0] // PATCH) * (input_size[1] // PATCH)
    visible = _visible_patches(patches, mask, mask_ratio)
    per_patch = encoder_macs_per_patch(depths, dims, in_chans)
    return FcmaeGmacs(
        encoder_dense=patches * per_patch / 1e9,
        encoder_useful=visible * per_patch / 1e9,
        decoder=decoder_macs(patches, patches - visible, dims[-1], decoder_dim, decoder_depth, in_chans) / 1e9,
    )
