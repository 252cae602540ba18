"""`sparse-mae bench [hydra overrides]`: the benchmark grid of conf/bench.yaml.

    sparse-mae bench bench=quick                      # a couple of minutes on a laptop CPU
    sparse-mae bench bench=full
    sparse-mae bench bench=quick backends=[native,dense_masked] variants=[atto,tiny] mask_ratios=[0.4,0.6]
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sparse_mae.bench import BenchSettings, run_bench, write_results

CONFIG_MODULE = "sparse_mae_conf"
CONFIG_NAME = "bench"


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae bench <overrides>` would run (for tests and notebooks)."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides or []))


def run(cfg: DictConfig, out_dir: str | Path, log=print) -> tuple[list[dict], dict[str, Path]]:
    settings = BenchSettings.from_config(OmegaConf.to_container(cfg, resolve=True))
    log(f"benchmark: {len(settings.backends)} backends x {len(settings.variants)} variants x "
        f"{len(settings.mask_ratios)} mask ratios x {len(settings.batch_sizes)} batch sizes x "
        f"{len(settings.dtypes)} dtypes at {settings.image_size}px on {settings.resolved_device}; output {out_dir}")
    peaks: dict = {}
    rows = run_bench(settings, log=log, peaks=peaks)
    paths = write_results(rows, settings, Path(out_dir), plots=bool(cfg.get("plots", True)), peaks=peaks)
    log(Path(paths["md"]).read_text())
    log("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows, paths


def main() -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
    def _app(cfg: DictConfig) -> None:
        run(cfg, HydraConfig.get().runtime.output_dir)

    _app()
    return 0
