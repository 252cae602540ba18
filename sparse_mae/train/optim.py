"""Optimizer parameter groups."""
from __future__ import annotations

import torch.nn as nn


def no_weight_decay(name: str, param: nn.Parameter, skip: tuple[str, ...] = ()) -> bool:
    """Biases, norm / GRN gains (1-D) and learned tokens get no weight decay (as in MAE/ConvNeXt)."""
    return param.ndim <= 1 or name.endswith(".bias") or any(s in name for s in skip)


def param_groups_weight_decay(model: nn.Module, weight_decay: float, skip: tuple[str, ...] = ("mask_token",)):
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param, skip) else decay).append(param)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]
