"""Exponential moving average of a model's weights (the fine-tuning recipe's EMA)."""
from __future__ import annotations

import copy

import torch


class ModelEma:
    """A frozen copy of the model whose parameters and buffers follow the trained ones:
    ema = decay * ema + (1 - decay) * weights after every optimizer step (integer buffers
    are copied). It starts from the weights it is given; `module` is what gets evaluated
    and checkpointed. (torch.optim.swa_utils.AveragedModel would copy the weights on its
    first update instead of averaging, and nest its state under `module.`, which our
    checkpoints' `ema` entry does not.)"""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay  # range: config.apps.EmaConfig.decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.detach(), 1.0 - self.decay)
            else:
                ema_v.copy_(v)
