"""An independent reference of SparK's sparse ResNet encoder, written from the paper (Tian et
al., "Designing BERT for Convolutional Networks", ICLR 2023, section 3.1 and appendix): a
sparse convolution computes only at the non-masked positions, which on a zero-filled map is
a dense convolution whose output is masked again; sparse BatchNorm takes its statistics over
the non-masked positions only; masked positions never contribute to a max.

Plain functional torch over the parameters by their timm names (no model code, no backend
code), in float32: the tests compare both backends' features, gradients and running
statistics against it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-5
MOMENTUM = 0.1


def reference_stages(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], imgs: torch.Tensor,
                     mask: torch.Tensor, training: bool = True) -> list[torch.Tensor]:
    """params / buffers: a ResNet's named parameters / buffers (timm names); buffers are
    updated in place in training mode. imgs (N, C, H, W); mask (N, H/32, W/32), 1 = removed.
    -> layer1..4 outputs, zero at removed sites."""
    height = imgs.shape[-2]
    patch = height // mask.shape[-2]

    def keep(x):  # (N, 1, h, w) bool at x's resolution
        f = x.shape[-2] * patch // height
        return (mask == 0).repeat_interleave(f, 1).repeat_interleave(f, 2).unsqueeze(1)

    def conv(x, name, stride=1):
        w = params[f"{name}.weight"]
        y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)
        return y * keep(y)

    def bn(x, name):
        k = keep(x)
        count = k.sum()
        if training:
            mean = (x * k).sum(dim=(0, 2, 3)) / count
            var = (((x - mean.view(1, -1, 1, 1)) * k) ** 2).sum(dim=(0, 2, 3)) / count
            with torch.no_grad():
                rm, rv = buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"]
                rm.mul_(1 - MOMENTUM).add_(MOMENTUM * mean)
                rv.mul_(1 - MOMENTUM).add_(MOMENTUM * var * count / (count - 1))
                buffers[f"{name}.num_batches_tracked"].add_(1)
        else:
            mean, var = buffers[f"{name}.running_mean"], buffers[f"{name}.running_var"]
        y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + EPS)
        y = y * params[f"{name}.weight"].view(1, -1, 1, 1) + params[f"{name}.bias"].view(1, -1, 1, 1)
        return y * k

    def max_pool(x):
        y = F.max_pool2d(torch.where(keep(x), x, float("-inf")), 3, stride=2, padding=1)
        return torch.where(keep(y), y, 0.0)

    x = imgs * keep(imgs)
    x = max_pool(F.relu(bn(conv(x, "conv1", stride=2), "bn1")))
    features = []
    for layer in range(1, 5):
        j = 0
        while f"layer{layer}.{j}.conv1.weight" in params:
            name = f"layer{layer}.{j}"
            stride = 2 if layer > 1 and j == 0 else 1
            bottleneck = f"{name}.conv3.weight" in params
            shortcut = x
            if f"{name}.downsample.0.weight" in params:
                shortcut = bn(conv(x, f"{name}.downsample.0", stride), f"{name}.downsample.1")
            if bottleneck:  # the stride on the 3x3 (v1.5)
                y = F.relu(bn(conv(x, f"{name}.conv1"), f"{name}.bn1"))
                y = F.relu(bn(conv(y, f"{name}.conv2", stride), f"{name}.bn2"))
                y = bn(conv(y, f"{name}.conv3"), f"{name}.bn3")
            else:
                y = F.relu(bn(conv(x, f"{name}.conv1", stride), f"{name}.bn1"))
                y = bn(conv(y, f"{name}.conv2"), f"{name}.bn2")
            x = F.relu(y + shortcut)
            j += 1
        features.append(x)
    return features
