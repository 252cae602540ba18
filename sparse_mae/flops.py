"""FLOP accounting in MACs (multiply-accumulates), as the paper's GFLOPs column.

Two ways, which agree on dense models (a test checks it):
- `measured_gmacs`: torch's FlopCounterMode over a real forward (on the meta device, so
  even `huge` costs no memory); it counts convs and matmuls at 2 FLOPs per MAC.
- analytic per-patch costs: because masks are patch-aligned, every visible 32x32 patch
  costs the encoder exactly the same, so the useful sparse work is
  `visible_patches * encoder_macs_per_patch`.
Norms, GELU and GRN are not counted (neither by the paper nor by FlopCounterMode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_mae.models.convnextv2 import VARIANTS
from sparse_mae.models.geometry import (
    DOWNSAMPLE_STRIDE, KERNEL_SIZE, NUM_STAGES, PATCH, STAGE_SITES_PER_PATCH, STEM_STRIDE, visible_count,
)


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
    """Per-image GMACs of one FCMAE forward."""

    encoder_dense: float  # the encoder on every patch
    encoder_useful: float  # the encoder on the visible patches only
    decoder: float  # proj and blocks over all patches, pred over the removed ones (as training runs)

    @property
    def total_dense(self) -> float:
        return self.encoder_dense + self.decoder

    @property
    def total_useful(self) -> float:
        return self.encoder_useful + self.decoder


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
    if mask is not None:
        visible = float((mask == 0).sum()) / mask.shape[0]
    elif mask_ratio is not None:
        visible = float(visible_count(patches, mask_ratio))
    else:
        visible = float(patches)
    per_patch = encoder_macs_per_patch(depths, dims, in_chans)
    return FcmaeGmacs(
        encoder_dense=patches * per_patch / 1e9,
        encoder_useful=visible * per_patch / 1e9,
        decoder=decoder_macs(patches, patches - visible, dims[-1], decoder_dim, decoder_depth, in_chans) / 1e9,
    )
