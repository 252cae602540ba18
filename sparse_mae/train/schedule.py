"""Learning-rate schedule, evaluated per optimizer step (not per epoch)."""
from __future__ import annotations

import math

# MAE's and ConvNeXt V2's linear scaling rule: a base lr is quoted for a batch of 256
REFERENCE_BATCH = 256


def linear_scaled_lr(base_lr: float, batch: int) -> float:
    """The lr for `batch` images per step, from a base lr quoted per 256."""
    return base_lr * batch / REFERENCE_BATCH


def peak_lr(optim, effective_batch: int) -> float:
    """An optimizer config's peak lr: `optim.lr` when set, else `optim.blr` scaled to the
    effective batch (every process, every accumulated micro-batch)."""
    return optim.lr if optim.lr is not None else linear_scaled_lr(optim.blr, effective_batch)


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then half-cosine down to `min_lr`
    at `total_steps`. `step` counts optimizer steps from 0."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(1.0, progress)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Set every group's lr, scaled by the group's optional `lr_scale` (layer decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
