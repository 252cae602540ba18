"""`sparse-mae bench [hydra overrides]`: the benchmark grid (schema: config.apps.BenchConfig).

    sparse-mae bench bench=quick                      # a couple of minutes on a laptop CPU
    sparse-mae bench bench=loader                     # folder vs shard loading; pretrain from shards vs the step
    sparse-mae bench bench=full
    sparse-mae bench bench=quick backends=[native,dense_masked] variants=[atto,tiny] mask_ratios=[0.4,0.6]
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.apps.app import compose, hydra_main
from sparse_mae.bench import run_bench, settings_from, write_results


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae bench <overrides>` would run (for tests and notebooks)."""
    return compose("bench", overrides)


def run(cfg: DictConfig, out_dir: str | Path, log=print) -> tuple[list[dict], dict[str, Path]]:
    if str(cfg.suite) == "loader":
        from sparse_mae.bench.loader import run_loader_bench

        rows, paths = run_loader_bench(cfg, out_dir, log)
        log(Path(paths["md"]).read_text())
        return rows, paths
    settings = settings_from(cfg)
    log(f"benchmark: {len(settings.backends)} backends x {len(settings.variants)} variants x "
        f"{len(settings.mask_ratios)} mask ratios x {len(settings.batch_sizes)} batch sizes x "
        f"{len(settings.dtypes)} dtypes at {settings.image_size}px on {settings.device}; output {out_dir}")
    peaks: dict = {}
    rows = run_bench(settings, log=log, peaks=peaks)
    paths = write_results(rows, settings, Path(out_dir), plots=bool(cfg.get("plots", True)), peaks=peaks)
    log(Path(paths["md"]).read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows, paths


def main() -> int:
    return hydra_main("bench", run)
