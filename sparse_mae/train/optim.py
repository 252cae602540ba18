"""Optimizer parameter groups: weight decay (pretraining) and layer-wise lr decay (fine-tuning)."""
from __future__ import annotations

import re

import torch.nn as nn

from sparse_mae.models.convnextv2 import NUM_LAYER_IDS, layer_id
from sparse_mae.models.resnet import ResNet


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


def resnet_layer_id(name: str, depths) -> int:
    """Layer-decay group of a ResNet classifier parameter, one per residual block as SparK's
    fine-tuning groups them: the stem (conv1, bn1) 0, the blocks 1..sum(depths) in order, fc last."""
    if name.startswith(("conv1.", "bn1.")):
        return 0
    if m := re.match(r"layer(\d)\.(\d+)\.", name):
        return 1 + sum(depths[:int(m[1]) - 1]) + int(m[2])
    return sum(depths) + 1  # fc


def param_groups_layer_decay(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (layer id, decay or not) of a classifier, with `lr_scale` =
    layer_decay ** (head id - id), the head at 1 (read by train.schedule.set_lr). ConvNeXt V2:
    ids 0..13 (its fine-tuning code's); ResNet: one id per block (resnet_layer_id)."""
    if isinstance(model, ResNet):
        ids, head_id = (lambda name: resnet_layer_id(name, model.depths)), sum(model.depths) + 1
    else:
        ids, head_id = layer_id, NUM_LAYER_IDS + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decay = ids(name), not no_weight_decay(name, param)
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (head_id - lid), "layer_id": lid})
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]
