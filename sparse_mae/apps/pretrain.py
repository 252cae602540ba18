"""`sparse-mae pretrain [hydra overrides]`: FCMAE pretraining of ConvNeXt V2 and SparK pretraining
of ResNets (`model=resnet50`); schema: config.apps.PretrainConfig.

The app is the masked-reconstruction loss and the reconstruction picture; the step loop,
checkpoints, resume and the non-finite policy are sparse_mae.train's engine. Every
sample's crop, flip and mask come from its own seed (train.sampler), so a resumed run, or
a run on more processes with the same global batch, sees exactly the same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.apps.app import compose, hydra_main
from sparse_mae.backends import resolve_backend
from sparse_mae.data.build import pretrain_dataset
from sparse_mae.data.loader import to_model
from sparse_mae.build import create_model
from sparse_mae.models import pretraining_model_name
from sparse_mae.models.sparse_norm import convert_sync_batchnorm
from sparse_mae.models.convnextv2 import PATCH
from sparse_mae.models.fcmae import masks_from_seeds
from sparse_mae.train.distributed import DistInfo, run_on_main
from sparse_mae.train.amp import resolve_amp
from sparse_mae.train.engine import Run, RunResult, TrainTask, train
from sparse_mae.errors import TrainingDiverged
from sparse_mae.train.signals import abandon_if_stopped
from sparse_mae.train.step import fcmae_loss, fcmae_param_groups
from sparse_mae.train.reconstruction import save_reconstruction

# Kept for callers of earlier versions: the non-finite stop is the engine's now.
NonFiniteLossError = TrainingDiverged


@dataclass
class PretrainResult(RunResult):
    reconstruction: Path | None = None


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae pretrain <overrides>` would run (for tests and notebooks)."""
    return compose("pretrain", overrides)


# -- the task ----------------------------------------------------------------------------

class PretrainTask(TrainTask):
    name = "pretrain"

    def __init__(self, cfg: DictConfig, di: DistInfo):
        self.cfg, self.device, self.is_main = cfg, di.device, di.is_main
        self.backend = resolve_backend(cfg.backend.name)
        self.model_name = pretraining_model_name(str(cfg.model.variant))
        if self.model_name.startswith("spark_"):
            self.model = create_model(self.model_name, backend=self.backend, norm_pix_loss=cfg.model.norm_pix_loss,
                                      decoder_dim=cfg.model.decoder_dim).to(di.device)
            if cfg.model.sync_bn and di.enabled:  # BN statistics over the global batch's visible sites
                convert_sync_batchnorm(self.model)
        else:
            self.model = create_model(
                self.model_name, backend=self.backend,
                norm_pix_loss=cfg.model.norm_pix_loss, decoder_dim=cfg.model.decoder_dim,
                decoder_depth=cfg.model.decoder_depth, drop_path_rate=cfg.model.drop_path_rate,
            ).to(di.device)
        self.amp = resolve_amp(cfg.amp, di.device, self.model.backend.autocast_devices, f"backend {self.backend}")
        self.dataset = pretrain_dataset(cfg.data)
        self.num_patches = (cfg.data.size // PATCH) ** 2
        self.recon_path: Path | None = None
        self._recon_batch = None
        self.knn = None
        if cfg.knn.enabled:
            from sparse_mae.probe.monitor import KnnMonitor

            # rank 0 opens and checks the kNN splits; a refusal there stops every rank (exit 2)
            self.knn = run_on_main(lambda: KnnMonitor(cfg.data, cfg.knn, di.device, self.amp))

    def describe(self) -> str:
        empty = len(getattr(self.dataset, "empty_files", []))
        return (f"{self.model_name}, backend {self.backend}, {self.cfg.data.size}px"
                + (f", {empty} zero-byte image file(s) set aside" if empty else "")
                + (f", {self.knn.describe()}" if self.knn is not None else ""))

    def init_weights(self, log) -> None:
        if self.cfg.init:
            from sparse_mae.convert.starting_weights import load_starting_weights

            loaded = load_starting_weights(self.model, self.cfg.init, self.cfg.init_format,
                                           variant=str(self.cfg.model.variant), option="init")
            log(f"init: {loaded}")

    def param_groups(self) -> list[dict]:
        return fcmae_param_groups(self.model, self.cfg.optim.weight_decay)

    def loss(self, model, batch: dict, step: int, micro: int) -> torch.Tensor:
        return fcmae_loss(model, batch, self.cfg.mask_ratio)

    def after_step(self, run: Run, step: int, last: bool) -> None:
        every = self.cfg.recon.every_steps
        if run.dist.is_main and ((every and step % every == 0) or last):
            self.reconstruct(run, step)
        if self.knn is not None and (step % self.cfg.knn.every_steps == 0 or last):
            record = self.knn(self.model.encoder, run.stop)
            run.logger.log(record, step)
            run.logger.write(f"step {step}: kNN top-1 {record['knn/top1']:.2f}%, top-5 {record['knn/top5']:.2f}% "
                             f"({record['knn/seconds']:.1f} s)")

    def reconstruct(self, run: Run, step: int) -> None:
        """The same images and masks at every picture of a run (and across resumes)."""
        cfg = self.cfg
        abandon_if_stopped(run.stop, "reconstruction pictures")  # one short forward, but the stop need not wait
        if self._recon_batch is None:
            n = min(cfg.recon.num_images, len(self.dataset))
            if n == 0:
                return
            seeds = [cfg.seed * 7919 + i for i in range(n)]
            imgs = to_model([self.dataset[(i, s)] for i, s in enumerate(seeds)], self.device, self.dataset)["image"]
            self._recon_batch = imgs, masks_from_seeds(torch.tensor(seeds), self.num_patches, cfg.mask_ratio).to(
                self.device)
        imgs, mask = self._recon_batch
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            path = run.dir.path / "reconstructions" / f"step-{step:08d}.png"
            latest = run.dir.path / "reconstruction.png"
            save_reconstruction(self.model, imgs, mask, path, latest)
        self.recon_path = latest
        run.logger.log_image("reconstruction", path, step, caption="original | masked | prediction | pasted")


# -- the run -----------------------------------------------------------------------------

def run_pretrain(cfg: DictConfig, run_dir: str | Path | None = None) -> PretrainResult:
    """Run (or continue) one pretraining job; returns where its outputs are."""
    result, task = train(cfg, PretrainTask, run_dir)
    empty = len(getattr(task.dataset, "empty_files", []))
    result = PretrainResult(**{**vars(result), "skipped_files": result.skipped_files + empty},
                            reconstruction=task.recon_path)
    if task.is_main:
        print(f"\nrun directory:  {result.run_dir}\ncheckpoint:     {result.checkpoint}\n"
              f"metrics:        {result.metrics}\nreconstruction: {result.reconstruction}"
              + (f"\nskipped files:  {result.skipped_files}" if result.skipped_files else "")
              + (f"\nskipped steps:  {result.nonfinite_steps} (non-finite loss or gradients)"
                 if result.nonfinite_steps else "")
              + (f"\nwandb:          {result.run_dir / 'wandb'} ({cfg.logger.mode}; `wandb sync` uploads an offline "
                 f"run)" if cfg.logger.name == "wandb" else ""),
              flush=True)
    return result


def main() -> int:
    return hydra_main("pretrain", run_pretrain)
