"""The kNN monitor of pretraining: every `knn.every_steps` optimizer steps (and at the end)
the encoder embeds a fixed labelled subset (memory bank: training images; queries: val
images, both centre-cropped at the run's data.size) and the weighted-kNN top-1 / top-5 go
to metrics.jsonl and wandb as knn/top1, knn/top5 (with knn/seconds, its cost). Its splits
come from the apps' one factory (sparse_mae.data.build.knn_splits), opened and checked when
the run starts.

It leaves the run exactly as it found it, so a run with the monitor ends bit for bit like
one without: the dense encoder runs under no_grad in eval mode (each module's own
training flag is put back after), images are read in this process in a fixed order (no
DataLoader, which draws a seed from the global RNG), and the global RNG states are saved
and restored around it all the same, in case a future model draws in eval mode.
"""
from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from sparse_mae.data.build import knn_splits
from sparse_mae.probe.classify import knn_classify
from sparse_mae.probe.features import FeatureHead, batches_of, embed, evenly_spaced
from sparse_mae.train.rng import capture_rng_state, restore_rng_state
from sparse_mae.train.signals import StopRequest


class KnnMonitor:
    """Built once per run (rank 0); `__call__(encoder, step)` -> {"knn/top1", "knn/top5", "knn/seconds"}."""

    def __init__(self, data_cfg: DictConfig, knn_cfg: DictConfig, device: torch.device, amp: bool = False):
        self.cfg, self.device, self.amp = knn_cfg, device, amp
        self.bank_set, self.query_set, self.num_classes = knn_splits(data_cfg, knn_cfg)  # checked: exit 2 at start
        self.bank_idx = evenly_spaced(len(self.bank_set), knn_cfg.num_train)
        self.query_idx = evenly_spaced(len(self.query_set), knn_cfg.num_val)

    def describe(self) -> str:
        return (f"kNN monitor every {self.cfg.every_steps} steps: {len(self.bank_idx)} bank / "
                f"{len(self.query_idx)} query images, k {self.cfg.k}, temperature {self.cfg.temperature}")

    def __call__(self, encoder: torch.nn.Module, stop: StopRequest | None = None) -> dict[str, float]:
        """A stop signal (`stop`) abandons it at the next batch (PhaseAbandoned)."""
        start = time.perf_counter()
        rng = capture_rng_state()
        modes = {m: m.training for m in encoder.modules()}
        encoder.eval()
        try:
            head = FeatureHead(encoder.num_features)
            bank_x, bank_y = embed(encoder, head, batches_of(self.bank_set, self.bank_idx, self.cfg.batch_size),
                                   self.device, self.amp, stop)
            query_x, query_y = embed(encoder, head, batches_of(self.query_set, self.query_idx, self.cfg.batch_size),
                                     self.device, self.amp, stop)
        finally:
            for module, training in modes.items():
                module.training = training
            restore_rng_state(rng)
        result = knn_classify(bank_x, bank_y, query_x, query_y, self.num_classes, self.cfg.k, self.cfg.temperature)
        return {"knn/top1": result["top1"], "knn/top5": result["top5"],
                "knn/seconds": time.perf_counter() - start}
