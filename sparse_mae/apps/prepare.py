"""`sparse-mae prepare src=<image folder> out=<shard folder>`: image folder -> indexed shards;
a src holding the Fashion-MNIST idx files -> out/train and out/val (schema:
config.PrepareConfig; the work: sparse_mae.data.prepare)."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from sparse_mae.apps.app import compose, tool_main
from sparse_mae.data.prepare import PrepareOptions, holds_fashion_mnist, prepare, prepare_fashion_mnist


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    return compose("prepare", overrides)


def run_prepare(cfg: DictConfig) -> dict[str, dict]:
    """-> {shard folder under out ('' for out itself): its manifest}."""
    from tqdm import tqdm

    from sparse_mae.config import FashionMnistImages

    options = PrepareOptions(short_side=cfg.short_side, quality=cfg.quality, shard_size=cfg.shard_size)
    bar = tqdm(unit="img", desc="prepare", disable=not cfg.progress, dynamic_ncols=True)

    def start(total: int):
        bar.total = total
        bar.refresh()
        return bar.update

    fmnist = holds_fashion_mnist(cfg.src)
    workers = cfg.workers or os.cpu_count() or 1
    try:
        if fmnist:
            manifests = prepare_fashion_mnist(cfg.src, cfg.out, options, workers, progress=start, log=bar.write)
        else:
            manifests = {"": prepare(cfg.src, cfg.out, options, workers, progress=start, log=bar.write)}
    finally:
        bar.close()
    for folder, manifest in manifests.items():
        where = os.path.join(cfg.out, folder) if folder else cfg.out
        bad = len(manifest["unreadable"])
        classes = manifest["classes"]
        print(f"{where}: {manifest['samples']} images in {len(manifest['shards'])} shards"
              + (f", {len(classes)} classes" if classes else ", no labels")
              + (f"; {bad} unreadable file(s) skipped, listed in {os.path.join(where, 'unreadable.txt')}" if bad else ""))
    if fmnist:  # the shards hold 32px images; the apps' Fashion-MNIST size is not the shards' default
        size = f"data.size={FashionMnistImages.size}"
        print(f"Fashion-MNIST at 32px, lossless: finetune / probe with finetune/data@data=shards data.root={cfg.out} "
              f"{size}; pretrain with data=shards data.root={os.path.join(cfg.out, 'train')} {size}")
    return manifests


def main() -> int:
    return tool_main("prepare", lambda cfg: run_prepare(cfg) and 0)
