"""SparK's sparse BatchNorm: statistics over the visible sites of the whole batch only.

The one place that runs a BatchNorm module on sparse features, for the encoders of every
backend (`batch_norm_rows` on packed rows) and for SparK's densify norms and the
dense_masked backend (`visible_batch_norm` on a zero-filled map). The module's own forward
runs, so its training / eval mode, momentum, running-statistics update and SyncBatchNorm's
all-reduce over DDP processes are torch's own.
"""
from __future__ import annotations

import torch
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
