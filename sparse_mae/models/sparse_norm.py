"""SparK's sparse BatchNorm: statistics over the visible sites of the whole batch only.

The one place that runs a BatchNorm module on sparse features, for the encoders of every
backend (`batch_norm_rows` on packed rows) and for SparK's densify norms and the
dense_masked backend (`visible_batch_norm` on a zero-filled map). The module's own forward
runs, so its training / eval mode, momentum and running-statistics update are torch's own,
and a `SyncBatchNorm2d` (below; `convert_sync_batchnorm`) all-reduces the statistics over
the DDP processes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norm_rows(bn: _BatchNorm, rows: torch.Tensor) -> torch.Tensor:
    """bn over packed rows (M, C), one row per visible site: statistics over the M rows. Runs
    on the (M, C, 1, 1) view (no copy; a BatchNorm2d takes 4-d input)."""
    return bn(rows.view(*rows.shape, 1, 1)).view(rows.shape)


def visible_batch_norm(bn: _BatchNorm, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """bn over the visible sites of a map (SparK's SparseBatchNorm2d): x (N, C, h, w), visible
    (N, h, w) bool -> (N, C, h, w), zeros at the other sites."""
    nhwc = x.permute(0, 2, 3, 1)
    rows = batch_norm_rows(bn, nhwc[visible])
    out = rows.new_zeros(*nhwc.shape[:3], rows.shape[1])
    out[visible] = rows
    return out.permute(0, 3, 1, 2)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose training statistics are summed over the DDP processes, on any device
    (torch's nn.SyncBatchNorm refuses CPU tensors). The same parameters and buffers as
    BatchNorm2d, so checkpoints do not change; with one process, or in eval mode, it is one.

    Each process all-reduces (sum, sum of squares, count) per channel in float32; the
    all-reduce's backward all-reduces the gradients of those sums, so every process gets the
    gradient of the global statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c).float()
        local = torch.cat([rows.sum(0), rows.square().sum(0), rows.new_full((1,), rows.shape[0])])
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = (total[c:2 * c] / count - mean.square()).clamp_min(0.0)
        self._update_running_stats(mean.detach(), var.detach(), count.detach())
        scale = torch.rsqrt(var + self.eps) * self.weight
        out = (rows - mean) * scale + self.bias
        return out.to(x.dtype).view(n, h, w, c).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        # _BatchNorm's rule: running variance from the unbiased variance, momentum None = cumulative average
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(factor * mean)
        self.running_var.mul_(1 - factor).add_(factor * var * count / (count - 1).clamp_min(1))


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every nn.BatchNorm2d of `module` replaced in place by a SyncBatchNorm2d holding the same
    parameters and buffers; returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats, device=child.weight.device, dtype=child.weight.dtype)
            synced.load_state_dict(child.state_dict())
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            convert_sync_batchnorm(child)
    return module
