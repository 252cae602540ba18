"""`sparse-mae probe [ckpt=PATH] [overrides]`: linear probe and kNN on frozen encoder features
(schema: config.apps.ProbeConfig).

The encoder (from any checkpoint `import` reads, or random init of model=) embeds the
train and val splits once, centre-cropped; sparse_mae.probe does the rest: features
(pool + final LayerNorm), weighted kNN, and the BatchNorm + Linear probe of MAE.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.apps.app import compose, interruptible, tool_main
from sparse_mae.data.build import labelled_split
from sparse_mae.data.loader import make_loader
from sparse_mae.io import atomic_write_text
from sparse_mae.probe.classify import knn_classify, linear_probe
from sparse_mae.probe.features import embed, load_encoder
from sparse_mae.train.signals import StopRequest, ignore_in_worker


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae probe <overrides>` would run (for tests and notebooks)."""
    return compose("probe", overrides)


def run_probe(cfg: DictConfig, stop: StopRequest | None = None) -> dict:
    """-> {"knn": {"top1", "top5"}, "linear": {"top1", "top5", "train_loss"}, counts, source, seconds}."""
    from sparse_mae.train.distributed import resolve_device
    from sparse_mae.train.amp import resolve_amp

    start = time.perf_counter()
    device = resolve_device(cfg.device)
    amp = resolve_amp(cfg.amp, device)
    encoder, head, source = load_encoder(cfg.ckpt, str(cfg.model.variant), cfg.ckpt_format, seed=cfg.seed)
    encoder.to(device)
    train_set, classes = labelled_split(cfg.data, "train", augment=False)
    val_set, _ = labelled_split(cfg.data, "val", classes)

    def features(dataset):
        loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed, device=device,
                             worker_init_fn=ignore_in_worker(stop.signals if stop else []))
        return embed(encoder, head, loader, device, amp, stop)

    train_x, train_y = features(train_set)
    val_x, val_y = features(val_set)
    embedded = time.perf_counter()
    knn = knn_classify(train_x, train_y, val_x, val_y, len(classes), cfg.knn.k, cfg.knn.temperature)
    linear = linear_probe(train_x, train_y, val_x, val_y, len(classes), cfg.linear.epochs, cfg.linear.batch_size,
                          cfg.linear.lr, cfg.linear.weight_decay, seed=cfg.seed, stop=stop)
    result = {"knn": knn, "linear": linear, "num_train": len(train_y), "num_val": len(val_y),
              "num_classes": len(classes), "feature_dim": int(train_x.shape[1]), "source": source,
              "seconds": {"embed": embedded - start, "total": time.perf_counter() - start}}
    if cfg.out:
        atomic_write_text(Path(cfg.out) / "probe.json", json.dumps(result, indent=1))
    return result


def _run_and_print(cfg: DictConfig, stop: StopRequest) -> int:
    r = run_probe(cfg, stop)
    print(f"{r['source']}: {r['feature_dim']}-d features, {r['num_train']} train / {r['num_val']} val images, "
          f"{r['num_classes']} classes")
    print(f"kNN (k {cfg.knn.k}, T {cfg.knn.temperature}): top-1 {r['knn']['top1']:.2f}%  top-5 {r['knn']['top5']:.2f}%")
    print(f"linear probe ({cfg.linear.epochs} epochs): top-1 {r['linear']['top1']:.2f}%  "
          f"top-5 {r['linear']['top5']:.2f}%")
    if cfg.out:
        print(f"results: {Path(cfg.out) / 'probe.json'}")
    return 0


def main() -> int:
    return tool_main("probe", interruptible("probe", _run_and_print))
