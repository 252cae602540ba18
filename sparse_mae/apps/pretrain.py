"""`sparse-mae pretrain [hydra overrides]`: FCMAE pretraining (schema: config.PretrainConfig).

The app is the FCMAE loss on masked images and the reconstruction picture; the step loop,
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
from sparse_mae.backends import backend_availability, list_backends
from sparse_mae.models import create_model
from sparse_mae.models.fcmae import random_mask
from sparse_mae.train.distributed import DistInfo
from sparse_mae.train.engine import Run, RunResult, TrainTask, check_run_config, resolve_amp, train
from sparse_mae.train.errors import TrainingDiverged
from sparse_mae.train.optim import param_groups_weight_decay
from sparse_mae.train.reconstruction import save_reconstruction

# Masks are drawn from the sample seed XOR this salt, so they are independent of the crop.
MASK_SALT = 0x5A5A_1234_ABCD
# Backends in order of preference for backend=auto.
AUTO_BACKEND_ORDER = ("native", "dense_masked")
# Kept for callers of earlier versions: the non-finite stop is the engine's now.
NonFiniteLossError = TrainingDiverged


@dataclass
class PretrainResult(RunResult):
    reconstruction: Path | None = None


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae pretrain <overrides>` would run (for tests and notebooks)."""
    return compose("pretrain", overrides)


def resolve_backend(name: str) -> str:
    """"auto" -> the fastest backend available here; an explicit name must be available."""
    name = str(name)
    if name == "auto":
        for candidate in AUTO_BACKEND_ORDER:
            if candidate in list_backends() and backend_availability(candidate)[0]:
                return candidate
        raise ValueError(f"backend=auto found none of {AUTO_BACKEND_ORDER} available")
    ok, reason = backend_availability(name)
    if not ok:
        raise ValueError(f"backend={name} is not available here: {reason}. Use backend=auto or backend=dense_masked")
    return name


def validate_config(cfg: DictConfig) -> None:
    """Ranges and relations Hydra cannot check (it checks keys, types and choices)."""
    check_run_config(cfg)

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"invalid config: {message}")

    need(0 < cfg.mask_ratio < 1, f"mask_ratio must be in (0, 1), got {cfg.mask_ratio!r} (the paper uses 0.6)")
    from sparse_mae.config import check_pretrain_size

    problem = check_pretrain_size(cfg.data.size, cfg.mask_ratio)
    need(problem is None, problem)
    need(0 <= cfg.model.drop_path_rate < 1, f"model.drop_path_rate must be in [0, 1), got {cfg.model.drop_path_rate!r}")
    need(cfg.model.decoder_dim > 0 and cfg.model.decoder_depth > 0, "model.decoder_dim / decoder_depth must be > 0")
    need(cfg.recon.every_steps >= 0, f"recon.every_steps must be >= 0 (0: only at the end), got {cfg.recon.every_steps}")
    need(cfg.recon.num_images >= 0, f"recon.num_images must be >= 0, got {cfg.recon.num_images}")


# -- data --------------------------------------------------------------------------------

def build_dataset(data_cfg: DictConfig):
    from sparse_mae.data.transforms import TrainTransform

    transform = TrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
    if data_cfg.name == "builtin":
        from sparse_mae.data.builtin import BuiltinDataset

        return BuiltinDataset(data_cfg.num_images, data_cfg.draw_size, transform, seed=data_cfg.seed)
    from sparse_mae.data.imagefolder import ImageFolderDataset

    return ImageFolderDataset(data_cfg.root, transform)


def masks_from_seeds(seeds: torch.Tensor, num_patches: int, mask_ratio: float) -> torch.Tensor:
    """One mask per sample from that sample's seed -> (N, L) float, 1 = removed."""
    rows = [random_mask(1, num_patches, mask_ratio, generator=torch.Generator().manual_seed(int(s) ^ MASK_SALT))
            for s in seeds.tolist()]
    return torch.cat(rows)


# -- the task ----------------------------------------------------------------------------

class PretrainTask(TrainTask):
    name = "pretrain"

    def __init__(self, cfg: DictConfig, di: DistInfo):
        self.cfg, self.device, self.is_main = cfg, di.device, di.is_main
        self.backend = resolve_backend(cfg.backend.name)
        self.model = create_model(
            f"fcmae_convnextv2_{cfg.model.variant}", backend=self.backend, mask_ratio=cfg.mask_ratio,
            norm_pix_loss=cfg.model.norm_pix_loss, decoder_dim=cfg.model.decoder_dim,
            decoder_depth=cfg.model.decoder_depth, drop_path_rate=cfg.model.drop_path_rate,
        ).to(di.device)
        self.amp = resolve_amp(cfg.amp, di.device, self.model.backend.autocast_devices, f"backend {self.backend}")
        self.dataset = build_dataset(cfg.data)
        self.num_patches = (cfg.data.size // 32) ** 2
        self.recon_path: Path | None = None
        self._recon_batch = None

    def describe(self) -> str:
        empty = len(getattr(self.dataset, "empty_files", []))
        return (f"fcmae_convnextv2_{self.cfg.model.variant}, backend {self.backend}, {self.cfg.data.size}px"
                + (f", {empty} zero-byte image file(s) set aside" if empty else ""))

    def init_weights(self, log) -> None:
        if self.cfg.init:
            from sparse_mae.convert.starting_weights import load_starting_weights

            loaded = load_starting_weights(self.model, self.cfg.init, self.cfg.init_format,
                                           variant=str(self.cfg.model.variant), option="init")
            log(f"init: {loaded}")

    def param_groups(self) -> list[dict]:
        return param_groups_weight_decay(self.model, self.cfg.optim.weight_decay)

    def loss(self, model, batch: dict, step: int, micro: int) -> torch.Tensor:
        mask = masks_from_seeds(batch["seed"], self.num_patches, self.cfg.mask_ratio).to(self.device)
        loss, _, _ = model(batch["image"], mask=mask)
        return loss

    def after_step(self, run: Run, step: int, last: bool) -> None:
        every = self.cfg.recon.every_steps
        if run.dist.is_main and ((every and step % every == 0) or last):
            self.reconstruct(run, step)

    def reconstruct(self, run: Run, step: int) -> None:
        """The same images and masks at every picture of a run (and across resumes)."""
        cfg = self.cfg
        if self._recon_batch is None:
            n = min(cfg.recon.num_images, len(self.dataset))
            if n == 0:
                return
            seeds = [cfg.seed * 7919 + i for i in range(n)]
            imgs = torch.stack([self.dataset[(i, s)]["image"] for i, s in enumerate(seeds)]).to(self.device)
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
    validate_config(cfg)
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
