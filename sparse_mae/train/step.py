"""One optimizer step, defined once: the engine runs it, and `sparse-mae bench`, the demo
and benchmarks/ time it, so a benchmark measures exactly what training runs.

A step is: for each of `accum_iter` micro-batches, the task's loss under autocast and its
backward (DDP syncs gradients on the last one only); the loss averaged over ranks; the
gradient norm (clipped to `clip_grad` where set); then, if the loss and the norm are
finite, AdamW's update. A non-finite step updates nothing: the caller decides what that
means (the engine's non-finite policy).

The FCMAE loss the pretraining app trains with is here too (`fcmae_loss`), with its
parameter groups, so the bench does not rebuild either.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from sparse_mae.models.fcmae import masks_from_seeds
from sparse_mae.models.convnextv2 import PATCH
from sparse_mae.train.distributed import all_reduce_mean
from sparse_mae.train.optim import param_groups_weight_decay

LossFn = Callable[[torch.nn.Module, dict, int], torch.Tensor]  # (model, batch, micro index) -> loss


def build_optimizer(param_groups: list[dict], optim_cfg, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the run's betas, eps and groups (each group carries its weight decay).
    torch's fused kernel on CPU and CUDA: its per-tensor loop costs over a tenth of a small
    model's step."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(optim_cfg.betas), eps=optim_cfg.eps,
                             fused=device.type in ("cpu", "cuda"))


@dataclass
class StepResult:
    loss: float  # mean over micro-batches (and ranks)
    grad_norm: float | None  # before clipping; None when the loss was already non-finite
    problem: str | None  # why nothing was updated, or None


def train_step(model: torch.nn.Module, loss_fn: LossFn, micro_batches: Iterable[dict],
               optimizer: torch.optim.Optimizer, params: list[torch.Tensor], *, accum_iter: int = 1,
               clip_grad: float | None = None, autocast_dtype: torch.dtype | None = None,
               distributed: bool = False) -> StepResult:
    """One optimizer step over `accum_iter` micro-batches (batch tensors on the device).
    `model` may be DDP-wrapped (`distributed`); `params` are the trained parameters, for the
    gradient norm. The gradients are cleared at the end, whether or not weights changed."""
    device_type = next(iter(params)).device.type
    step_loss, problem = 0.0, None
    batches = iter(micro_batches)
    for micro in range(accum_iter):
        batch = next(batches)
        sync = micro == accum_iter - 1 or not distributed
        with model.no_sync() if not sync else contextlib.nullcontext():
            with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                enabled=autocast_dtype is not None):
                loss = loss_fn(model, batch, micro)
            global_loss = float(all_reduce_mean(loss.detach().float()))
            if not math.isfinite(global_loss) and problem is None:
                problem = f"loss is {global_loss} (micro-batch {micro})"
            # even a non-finite loss goes through backward: DDP expects the reduction it
            # prepared in forward; the step is dropped below
            (loss / accum_iter).backward()
        step_loss += global_loss / accum_iter
    grad_norm = None
    if problem is None:
        if clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        grad_norm = float(norm)
        if not math.isfinite(grad_norm):
            problem = f"gradient norm is {grad_norm} (loss {step_loss:.6g})"
    if problem is None:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss, grad_norm, problem)


# -- the FCMAE loss ---------------------------------------------------------------------------

def fcmae_loss(model: torch.nn.Module, batch: dict, mask_ratio: float) -> torch.Tensor:
    """FCMAE reconstruction loss of batch {"image": (N, C, H, W), "seed": (N,)}: each sample's
    mask comes from its own seed, so a resumed or re-sharded run masks alike."""
    imgs = batch["image"]
    num_patches = (imgs.shape[-2] // PATCH) * (imgs.shape[-1] // PATCH)
    mask = masks_from_seeds(batch["seed"], num_patches, mask_ratio).to(imgs.device)
    loss, _, _ = model(imgs, mask=mask, loss_only=True)
    return loss


def fcmae_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights only (not biases, norms, GRN, the mask token)."""
    return param_groups_weight_decay(model, weight_decay)
