"""Label smoothing, mixup and CutMix for fine-tuning (as in timm / the ConvNeXt recipe).

The random draws come from a numpy Generator the caller seeds, so a batch is mixed alike
in a resumed run (the fine-tuning task seeds it from (seed, step, micro-batch)); numpy's
Beta sampler replaces a hand-written one, since torch's distributions take no generator.
"""
from __future__ import annotations

import math

import numpy as np
import torch


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(N,) class indices -> (N, num_classes) smoothed one-hot targets."""
    off = smoothing / num_classes
    return torch.full((labels.numel(), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(imgs: torch.Tensor, targets: torch.Tensor, cfg, rng: np.random.Generator):
    """Mixup (blend with the batch reversed) or CutMix (paste a box from it); targets mixed
    by area. `cfg`: config.apps.MixupConfig. Returns (imgs, targets) unchanged when both alphas
    are 0 or the batch is not drawn for mixing."""
    mix, cut = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (mix or cut) or rng.random() >= cfg.prob:
        return imgs, targets
    use_cut = cut and (not mix or rng.random() < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cut else cfg.mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    flipped = imgs.flip(0)
    if use_cut:
        h, w = imgs.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        imgs = imgs * lam + flipped * (1.0 - lam)
    return imgs, targets * lam + targets.flip(0) * (1.0 - lam)
