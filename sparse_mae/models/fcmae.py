"""FCMAE: fully convolutional masked autoencoder (ConvNeXt V2, arXiv 2301.00808).

The forward is split into named steps, shapes in the docstrings:
patchify -> random_masking -> forward_encoder (any backend) -> forward_decoder -> forward_loss.
Mask convention: (N, L), 1 = removed, 0 = kept; L = (H/32) * (W/32).

The engine that runs the encoder is an object handed in (an instance of
`sparse_mae.backends.base.EncoderBackend`); the model imports no backend, and
`sparse_mae.create_model` builds one by name. The mask ratio is an argument of the forward
(as MAE's `forward(imgs, mask_ratio)`), not a stored setting.

Parameter names: `encoder.*` (the canonical ConvNeXt V2 layout without `head.*`),
`proj`, `mask_token`, `decoder.{j}.*` (dense Blocks), `pred`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_mae.models.convnextv2 import VARIANTS, Block, ConvNeXtV2, check_images, init_weights
from sparse_mae.models.geometry import PATCH, visible_count

if TYPE_CHECKING:  # type hints only: the backends sit above the models
    from sparse_mae.backends.base import EncoderBackend


class MaskedPretrainer(nn.Module):
    """What FCMAE and SparK share: a backend object running the encoder over the visible
    patches, the patch (un)folding, the mask draw and the per-patch normalised loss. A
    subclass sets `patch_size`, `in_chans`, `norm_pix_loss` and names the backend method
    its encoder needs (`backend_method`)."""

    backend_method = "encode"
    patch_size: int
    in_chans: int
    norm_pix_loss: bool

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def set_backend(self, backend: EncoderBackend) -> None:
        """Switch engines in place (an `EncoderBackend` instance, e.g.
        `sparse_mae.get_backend("native")`); parameters are shared by construction."""
        if isinstance(backend, str) or not callable(getattr(backend, self.backend_method, None)):
            raise TypeError(f"backend must be an encoder backend object (sparse_mae.get_backend(name)), "
                            f"got {backend!r}")
        self.backend = backend

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch in (p, q, c) order, patches row-major."""
        return patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); the inverse of patchify."""
        return unpatchify(x, grid, self.patch_size, self.in_chans)

    def random_masking(
        self, batch: int, num_patches: int, mask_ratio: float, device=None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """-> mask (N, L) float, 1 = removed; exactly visible_count(L, mask_ratio) kept per sample."""
        return random_mask(batch, num_patches, mask_ratio, device=device, generator=generator)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE on (per-patch normalised) pixels, averaged over removed patches only; pred
        (N, L, p*p*C) of every patch or (K, p*p*C) of the removed ones. -> scalar."""
        return masked_patch_loss(self.patchify(imgs), pred, mask, self.norm_pix_loss)

    def input_mask(self, imgs: torch.Tensor, mask_ratio: float | None, mask: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Checks imgs (N, C, H, W) and returns the forward's mask (N, L) on their device:
        drawn at `mask_ratio` or the given `mask`, checked (exactly one of the two)."""
        check_images(imgs, self.in_chans)
        n, _, h, w = imgs.shape
        num_patches = (h // self.patch_size) * (w // self.patch_size)
        if (mask is None) == (mask_ratio is None):
            raise ValueError(f"give {type(self).__name__}.forward either mask_ratio (a mask is drawn; the paper uses "
                             f"0.6) or mask")
        if mask is None:
            return self.random_masking(n, num_patches, mask_ratio, device=imgs.device, generator=generator)
        return check_mask(mask, n, num_patches).to(imgs.device)


class FCMAE(MaskedPretrainer):
    def __init__(
        self,
        backend: EncoderBackend,
        depths=(3, 3, 9, 3),
        dims=(96, 192, 384, 768),
        in_chans: int = 3,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 1,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if decoder_depth < 1 or decoder_dim < 1:
            raise ValueError(f"decoder_depth and decoder_dim must be >= 1, got {decoder_depth}, {decoder_dim}")
        self.patch_size = PATCH
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.set_backend(backend)
        self.encoder = ConvNeXtV2(depths, dims, in_chans, num_classes=0, drop_path_rate=drop_path_rate)
        self.proj = nn.Conv2d(dims[-1], decoder_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_dim, 1, 1))
        self.decoder = nn.Sequential(*[Block(decoder_dim) for _ in range(decoder_depth)])
        self.pred = nn.Conv2d(decoder_dim, PATCH * PATCH * in_chans, kernel_size=1)
        for m in (self.proj, self.decoder, self.pred):
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- steps -------------------------------------------------------------------------

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """imgs (N, C, H, W), mask (N, L) -> latent (N, C3, H/32, W/32), zero at removed patches."""
        n, _, h, w = imgs.shape
        grid_mask = mask.reshape(n, h // self.patch_size, w // self.patch_size)
        return self.backend.encode(self.encoder, imgs, grid_mask)

    def forward_decoder(self, latent: torch.Tensor, mask: torch.Tensor, removed_only: bool = False) -> torch.Tensor:
        """latent (N, C3, h, w), mask (N, L) -> pred (N, L, p*p*C); with `removed_only`, pred
        (K, p*p*C) of the K removed patches in (n, l) order: all the loss reads, and the pred
        layer (a 512 x 3072 matmul per patch) then skips the visible patches."""
        x = self.proj(latent)
        n, _, h, w = x.shape
        m = mask.reshape(n, 1, h, w).to(x.dtype)
        x = x * (1.0 - m) + self.mask_token.to(x.dtype) * m
        x = self.backend.decode_blocks(self.decoder, x)
        if removed_only:
            rows = x.flatten(2).transpose(1, 2)[mask.bool()]  # (K, decoder_dim)
            return F.linear(rows, self.pred.weight.flatten(1), self.pred.bias)
        return self.pred(x).flatten(2).transpose(1, 2)

    def uncounted_macs(self, imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """MACs of one forward that torch's FlopCounterMode cannot see (the backend's own
        kernels, in the encoder and the decoder); imgs (N, C, H, W), mask (N, L)."""
        n, _, h, w = imgs.shape
        grid = (h // self.patch_size, w // self.patch_size)
        decoder_input = torch.empty(n, self.mask_token.shape[1], *grid, device=imgs.device)
        return (self.backend.uncounted_macs(self.encoder, imgs, mask.reshape(n, *grid))
                + self.backend.uncounted_decode_macs(self.decoder, decoder_input))

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float | None = None, mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None, loss_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs (N, C, H, W) -> (loss scalar, pred (N, L, p*p*C), mask (N, L)). The mask is
        drawn at `mask_ratio` or given as `mask` (one of the two). With `loss_only`
        (training) pred is (K, p*p*C), the K removed patches only: the same loss."""
        mask = self.input_mask(imgs, mask_ratio, mask, generator)
        latent = self.forward_encoder(imgs, mask)
        pred = self.forward_decoder(latent, mask, removed_only=loss_only)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, p*p*C), each patch in (p, q, c) order, patches row-major."""
    n, c, h, w = imgs.shape
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, grid: tuple[int, int], p: int, in_chans: int) -> torch.Tensor:
    """(N, L, p*p*C) -> (N, C, H, W); the inverse of patchify."""
    n = x.shape[0]
    h, w = grid
    x = x.reshape(n, h, w, p, p, in_chans)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, in_chans, h * p, w * p)


def masked_patch_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """MAE's loss (FCMAE's and SparK's): MSE on (per-patch normalised) pixels averaged over the
    removed patches only. target (N, L, p*p*C) patchified images; pred (N, L, p*p*C) of every
    patch or (K, p*p*C) of the removed ones; mask (N, L), 1 = removed. -> scalar."""
    removed_only = pred.dim() == 2
    if removed_only:
        target = target[mask.bool()]
    if norm_pix_loss:  # per patch: (target - mean) / sqrt(unbiased var + 1e-6)
        centred = target - target.mean(dim=-1, keepdim=True)
        # the variance from the centred values' norm: torch's var over the last dim is a
        # scalar Welford pass on CPU, 10x slower than the rest of the loss's forward
        var = torch.linalg.vector_norm(centred, dim=-1, keepdim=True).square() / (target.shape[-1] - 1)
        target = centred / (var + 1e-6) ** 0.5
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if removed_only:
        return per_patch.sum() / per_patch.shape[0]
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


def check_mask_ratio(mask_ratio: float) -> None:
    if not (0.0 < float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}; the paper uses 0.6")


def random_mask(
    batch: int, num_patches: int, ratio: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, L) float mask, 1 = removed, drawn independently per sample (the ratio checked once)."""
    check_mask_ratio(ratio)
    return _mask_keeping(batch, num_patches, visible_count(num_patches, ratio), device, generator)


def _mask_keeping(batch: int, num_patches: int, keep: int, device, generator: torch.Generator | None) -> torch.Tensor:
    """(N, L) float mask keeping `keep` random patches of each sample."""
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    ids_keep = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones(batch, num_patches, device=gen_device)
    mask.scatter_(1, ids_keep, 0.0)
    return mask.to(device) if device is not None else mask


# Per-sample masks are drawn from the sample seed XOR this salt, so they are independent of
# the crop and flip drawn from the same seed.
MASK_SALT = 0x5A5A_1234_ABCD


def masks_from_seeds(seeds: torch.Tensor, num_patches: int, ratio: float) -> torch.Tensor:
    """One mask per sample from that sample's seed -> (N, L) float, 1 = removed. A sample is
    masked alike in any batch, on any number of processes, and after a resume. The ratio is
    checked once per call, not per sample."""
    check_mask_ratio(ratio)
    keep = visible_count(num_patches, ratio)
    rows = [_mask_keeping(1, num_patches, keep, None, torch.Generator().manual_seed(int(s) ^ MASK_SALT))
            for s in seeds.tolist()]
    return torch.cat(rows)


def check_mask(mask: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    """Validate a user-given mask; returns it as float."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, num_patches):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"mask must have shape (N, L) = ({batch}, {num_patches}) for these images "
            f"(L = (H/32)*(W/32)), got {shape}"
        )
    mask = mask.float()
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("mask values must be 0 (kept) or 1 (removed)")
    kept = (mask == 0).sum(dim=1)
    if torch.any(kept == 0):
        bad = torch.nonzero(kept == 0).flatten().tolist()
        raise ValueError(f"mask keeps 0 patches in sample(s) {bad}; every sample must keep at least 1 patch")
    return mask


def build_fcmae(variant: str, backend: EncoderBackend, **kwargs) -> FCMAE:
    spec = VARIANTS[variant]
    return FCMAE(backend, depths=spec.depths, dims=spec.dims, **kwargs)
