"""Optimizer parameter groups: weight decay (pretraining) and layer-wise lr decay (fine-tuning)."""
from __future__ import annotations

import torch.nn as nn

from sparse_mae.models.convnextv2 import NUM_LAYER_IDS, layer_id


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


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (layer id, decay or not) of a ConvNeXt V2 classifier, with `lr_scale` =
    layer_decay ** (13 - id) (read by train.schedule.set_lr)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decay = layer_id(name), not no_weight_decay(name, param)
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (NUM_LAYER_IDS + 1 - lid), "layer_id": lid})
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]
