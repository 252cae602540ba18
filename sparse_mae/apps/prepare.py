"""`sparse-mae prepare src=<image folder> out=<shard folder>`: image folder -> indexed shards
(schema: config.PrepareConfig; the work: sparse_mae.data.prepare)."""
from __future__ import annotations

import os

from omegaconf import DictConfig

from sparse_mae.apps.app import compose, tool_main
from sparse_mae.data.prepare import PrepareOptions, prepare


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    return compose("prepare", overrides)


def run_prepare(cfg: DictConfig) -> dict:
    from tqdm import tqdm

    options = PrepareOptions(short_side=cfg.short_side, quality=cfg.quality, shard_size=cfg.shard_size)
    bar = tqdm(unit="img", desc="prepare", disable=not cfg.progress, dynamic_ncols=True)

    def start(total: int):
        bar.total = total
        bar.refresh()
        return bar.update

    try:
        manifest = prepare(cfg.src, cfg.out, options, workers=cfg.workers or os.cpu_count() or 1,
                           progress=start, log=bar.write)
    finally:
        bar.close()
    bad = len(manifest["unreadable"])
    classes = manifest["classes"]
    print(f"{cfg.out}: {manifest['samples']} images in {len(manifest['shards'])} shards"
          + (f", {len(classes)} classes" if classes else ", no labels")
          + (f"; {bad} unreadable file(s) skipped, listed in {os.path.join(cfg.out, 'unreadable.txt')}" if bad else ""))
    return manifest


def main() -> int:
    return tool_main("prepare", lambda cfg: run_prepare(cfg) and 0)
