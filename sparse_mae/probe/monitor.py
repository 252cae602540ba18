"""The kNN monitor of pretraining: every `knn.every_steps` optimizer steps (and at the end)
the encoder embeds a fixed labelled subset (memory bank: training images; queries: val
images, both centre-cropped at the run's data.size) and the weighted-kNN top-1 / top-5 go
to metrics.jsonl and wandb as knn/top1, knn/top5 (with knn/seconds, its cost).

It leaves the run exactly as it found it, so a run with the monitor ends bit for bit like
one without: the dense encoder runs under no_grad in eval mode (each module's own
training flag is put back after), images are read in this process in a fixed order (no
DataLoader, which draws a seed from the global RNG), and the global RNG states are saved
and restored around it all the same, in case a future model draws in eval mode.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.data.manifest import MANIFEST
from sparse_mae.probe.classify import knn_classify
from sparse_mae.probe.features import FeatureHead, batches_of, embed, evenly_spaced
from sparse_mae.train.rng import capture_rng_state, restore_rng_state
from sparse_mae.train.signals import StopRequest


def monitor_splits(data_cfg: DictConfig, knn_cfg: DictConfig):
    """-> (bank dataset, query dataset, number of classes): labelled images at data.size,
    centre-cropped, from the pretraining data's own labels or from knn.root (image folders or
    shard folders, each as train/ and val/)."""
    from sparse_mae.data.transforms import EvalTransform

    transform = EvalTransform(data_cfg.size)
    if knn_cfg.root is not None and (Path(knn_cfg.root) / "train" / MANIFEST).is_file():
        from sparse_mae.data.decode import FastEvalTransform
        from sparse_mae.data.shards import ShardDataset

        # the same centre crop as EvalTransform, from the shards' bytes (uint8; embed normalises)
        bank = ShardDataset(Path(knn_cfg.root) / "train", FastEvalTransform(data_cfg.size), labelled=True)
        query = ShardDataset(Path(knn_cfg.root) / "val", FastEvalTransform(data_cfg.size), labelled=True,
                             classes=bank.classes)
        return bank, query, len(bank.classes)
    if knn_cfg.root is not None:
        from sparse_mae.data.imagefolder import LabelledImageFolderDataset

        bank = LabelledImageFolderDataset(Path(knn_cfg.root) / "train", transform)
        return bank, LabelledImageFolderDataset(Path(knn_cfg.root) / "val", transform, bank.classes), len(bank.classes)
    if data_cfg.name == "fashion_mnist":
        from sparse_mae.data.fashion_mnist import CLASSES, FashionMnist, FashionMnistDataset

        return (FashionMnistDataset(FashionMnist(data_cfg.root, "train"), transform),
                FashionMnistDataset(FashionMnist(data_cfg.root, "test"), transform), len(CLASSES))
    if data_cfg.name == "builtin":
        from sparse_mae.data.builtin import CLASSES, BuiltinDataset

        # the pretraining images are drawn from data.seed; queries from seed + 1, as finetune's val
        return (BuiltinDataset(knn_cfg.num_train, data_cfg.draw_size, transform, seed=data_cfg.seed),
                BuiltinDataset(knn_cfg.num_val, data_cfg.draw_size, transform, seed=data_cfg.seed + 1), len(CLASSES))
    raise ValueError(f"knn.enabled=true with data={data_cfg.name}: these images have no labels; pass "
                     f"knn.root=<folder with train/<class>/ and val/<class>/ image folders, or with train/ and val/ "
                     f"labelled shard folders>")


class KnnMonitor:
    """Built once per run (rank 0); `__call__(encoder, step)` -> {"knn/top1", "knn/top5", "knn/seconds"}."""

    def __init__(self, data_cfg: DictConfig, knn_cfg: DictConfig, device: torch.device, amp: bool = False):
        self.cfg, self.device, self.amp = knn_cfg, device, amp
        self.bank_set, self.query_set, self.num_classes = monitor_splits(data_cfg, knn_cfg)
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
