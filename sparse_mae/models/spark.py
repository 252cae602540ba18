"""SparK: BERT-style masked pretraining of ResNets (Tian et al., "Designing BERT for
Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR 2023, arXiv 2301.03580).

The forward is split into named steps, shapes in the docstrings (f = 32, the patch):
patchify -> random_masking -> forward_encoder (any backend: the sparse ResNet's four stages)
-> densify (sparse BN, mask tokens, projections) -> forward_decoder (the light UNet decoder)
-> forward_loss. Mask convention as FCMAE's: (N, L), 1 = removed, 0 = kept, L = (H/f)(W/f).

The encoder runs on a backend object (`EncoderBackend.encode_stages`, docs/design.md
section 7); the model imports no backend. The decoder is dense and runs here, in torch ops,
the same on every backend.

Parameter names follow SparK's own (so its checkpoints map by prefix): `encoder.*` (the
timm ResNet layout without `fc`), `densify_norms.{i}`, `mask_tokens.{i}`,
`densify_projs.{i}`, `decoder.dec.{j}.up_sample`, `decoder.dec.{j}.conv.{0,1,3,4}`,
`decoder.proj`; i = 0 is the coarsest stage (layer4), as SparK counts.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from sparse_mae.models.fcmae import MaskedPretrainer
from sparse_mae.models.geometry import PATCH
from sparse_mae.models.resnet import VARIANTS, ResNet
from sparse_mae.models.sparse_norm import visible_batch_norm

if TYPE_CHECKING:  # type hints only: the backends sit above the models
    from sparse_mae.backends.base import EncoderBackend

UPSAMPLE_BLOCKS = round(math.log2(PATCH))  # the decoder doubles the resolution from /32 back to /1: 5 blocks
DECODER_WIDTH_MULTIPLE = 2**UPSAMPLE_BLOCKS  # its width halves at every block


class UNetBlock(nn.Module):
    """x2 up (4x4/2 transposed conv) -> 3x3 conv -> BN -> ReLU6 -> 3x3 conv -> BN (SparK's)."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__()
        self.up_sample = nn.ConvTranspose2d(in_chs, in_chs, kernel_size=4, stride=2, padding=1, bias=True)
        self.conv = nn.Sequential(
            nn.Conv2d(in_chs, in_chs, 3, padding=1, bias=False), nn.BatchNorm2d(in_chs), nn.ReLU6(inplace=True),
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), nn.BatchNorm2d(out_chs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.up_sample(x))


class LightDecoder(nn.Module):
    """Five UNet blocks from /32 to /1, widths halving from `width`; the densified stage
    features are added before blocks 0..3 (coarsest first); a 1x1 conv to pixels."""

    def __init__(self, width: int, out_chans: int):
        super().__init__()
        if width % DECODER_WIDTH_MULTIPLE:
            raise ValueError(f"decoder_dim={width} must be a multiple of {DECODER_WIDTH_MULTIPLE}: the decoder halves "
                             f"it {UPSAMPLE_BLOCKS} times (SparK: 512)")
        self.width = width
        widths = [width // 2**i for i in range(UPSAMPLE_BLOCKS + 1)]
        self.dec = nn.ModuleList([UNetBlock(a, b) for a, b in zip(widths[:-1], widths[1:])])
        self.proj = nn.Conv2d(widths[-1], out_chans, kernel_size=1)
        self.apply(_init_decoder)

    def forward(self, to_dec: list[torch.Tensor]) -> torch.Tensor:
        """to_dec: densified features, coarsest first, [(N, width / 2^i, H/32 * 2^i, W/32 * 2^i)]
        -> (N, out_chans, H, W)."""
        x = 0
        for i, block in enumerate(self.dec):
            if i < len(to_dec):
                x = x + to_dec[i]
            x = block(x)
        return self.proj(x)


def _init_decoder(m: nn.Module) -> None:
    # SparK's LightDecoder.initialize
    if isinstance(m, nn.Conv2d):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.ConvTranspose2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d)) and m.bias is not None:
        nn.init.zeros_(m.bias)


class SparK(MaskedPretrainer):
    backend_method = "encode_stages"

    def __init__(
        self,
        backend: EncoderBackend,
        variant: str = "resnet50",
        in_chans: int = 3,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
    ):
        super().__init__()
        spec = VARIANTS[variant]
        self.patch_size = PATCH
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.set_backend(backend)
        self.encoder = ResNet(spec.block, spec.depths, spec.widths, spec.stem_width, in_chans, num_classes=0)
        self.decoder = LightDecoder(decoder_dim, in_chans)
        self.densify_norms = nn.ModuleList()
        self.mask_tokens = nn.ParameterList()
        self.densify_projs = nn.ModuleList()
        dec_width = decoder_dim
        for i, enc_width in enumerate(reversed(self.encoder.stage_dims)):  # coarsest first
            self.densify_norms.append(nn.BatchNorm2d(enc_width))
            token = nn.Parameter(torch.zeros(1, enc_width, 1, 1))
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            if i == 0 and enc_width == dec_width:  # SparK: no projection where the widths already agree
                self.densify_projs.append(nn.Identity())
            else:  # SparK: 1x1 on the coarsest stage, 3x3 on the others (torch's default init)
                k = 1 if i == 0 else 3
                self.densify_projs.append(nn.Conv2d(enc_width, dec_width, k, padding=k // 2, bias=True))
            dec_width //= 2

    # -- steps -------------------------------------------------------------------------

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """imgs (N, C, H, W), mask (N, L) -> layer1..4 features [(N, C_i, H/s_i, W/s_i)],
        s_i = 4, 8, 16, 32, zero at removed sites (the sparse encoder sees visible pixels only)."""
        n, _, h, w = imgs.shape
        return self.backend.encode_stages(self.encoder, imgs, mask.reshape(n, h // PATCH, w // PATCH))

    def densify(self, features: list[torch.Tensor], mask: torch.Tensor) -> list[torch.Tensor]:
        """Stage features (finest first, as forward_encoder gives them), mask (N, L) -> the
        decoder's inputs, coarsest first: [(N, decoder_dim / 2^i, H/32 * 2^i, W/32 * 2^i)].
        Per stage: BN over the visible sites, mask token at the removed ones, projection."""
        n = features[0].shape[0]
        h, w = features[-1].shape[-2:]
        visible = (mask.reshape(n, h, w) == 0)  # (N, h, w) at /32, dilated x2 per finer stage
        to_dec = []
        for i, x in enumerate(reversed(features)):
            x = visible_batch_norm(self.densify_norms[i], x, visible)
            x = torch.where(visible.unsqueeze(1), x, self.mask_tokens[i].to(x.dtype))
            to_dec.append(self.densify_projs[i](x))
            visible = visible.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)
        return to_dec

    def forward_decoder(self, to_dec: list[torch.Tensor], mask: torch.Tensor, removed_only: bool = False
                        ) -> torch.Tensor:
        """densified features (coarsest first), mask (N, L) -> pred (N, L, f*f*C); with
        `removed_only`, pred (K, f*f*C) of the K removed patches in (n, l) order (all the loss reads)."""
        pred = self.patchify(self.decoder(to_dec))
        return pred[mask.bool()] if removed_only else pred

    def uncounted_macs(self, imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """MACs of one forward FlopCounterMode cannot see: the backend's compiled encoder ops
        (the decoder is torch ops). mask (N, L)."""
        n, _, h, w = imgs.shape
        return self.backend.uncounted_macs(self.encoder, imgs, mask.reshape(n, h // PATCH, w // PATCH))

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None, loss_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> (loss scalar, pred (N, L, f*f*C), mask (N, L)), FCMAE's contract:
        the mask drawn at `mask_ratio` (SparK: 0.6) or given; with `loss_only` pred is
        (K, f*f*C), the removed patches only."""
        mask = self.input_mask(imgs, mask_ratio, mask, generator)
        features = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(self.densify(features, mask), mask, removed_only=loss_only)
        return self.forward_loss(imgs, pred, mask), pred, mask


def build_spark(variant: str, backend: EncoderBackend, **kwargs) -> SparK:
    if variant not in VARIANTS:
        raise ValueError(f"unknown ResNet variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return SparK(backend, variant, **kwargs)
