"""`sparse-mae pretrain [hydra overrides]`: FCMAE pretraining, composed from conf/pretrain.yaml.

One code path for a laptop CPU and for `torchrun` on many GPUs. Per optimizer step:
`accum_iter` micro-batches (DDP syncs gradients on the last), lr set from the per-step
warmup + half-cosine schedule, AdamW step. Every sample's crop, flip and mask come from
its own seed (train.sampler), so a resumed run, or a run on more processes with the same
global batch, sees exactly the same data. A non-finite loss stops the run before it
touches the weights; the last checkpoint on disk stays the last good one.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sparse_mae.backends import backend_availability, list_backends
from sparse_mae.models import VARIANTS, create_model
from sparse_mae.models.fcmae import random_mask
from sparse_mae.train.checkpoint import find_latest, load_checkpoint, resolve_resume, save_checkpoint
from sparse_mae.train.distributed import DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup_distributed, \
    init_distributed
from sparse_mae.train.metrics import RunLogger
from sparse_mae.train.optim import param_groups_weight_decay
from sparse_mae.train.reconstruction import save_reconstruction
from sparse_mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from sparse_mae.train.sampler import ResumableDistributedSampler
from sparse_mae.train.schedule import set_lr, warmup_cosine_lr

CONFIG_MODULE = "sparse_mae_conf"
CONFIG_NAME = "pretrain"
# Masks are drawn from the sample seed XOR this salt, so they are independent of the crop.
MASK_SALT = 0x5A5A_1234_ABCD
# Backends in order of preference for backend=auto.
AUTO_BACKEND_ORDER = ("native", "dense_masked")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run stopped without updating the weights."""


@dataclass
class PretrainResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: Path
    reconstruction: Path | None
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of every optimizer step run here
    skipped_files: int = 0  # unreadable image files met (each time one was met) + zero-byte files


# -- config ------------------------------------------------------------------------------


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae pretrain <overrides>` would run, without starting Hydra's app
    (for tests and notebooks). Output goes to the `output_dir` override."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides or []))


def resolve_backend(name: str) -> str:
    """"auto" -> the fastest backend available here; an explicit name must be available."""
    if name == "auto":
        registered = list_backends()
        for candidate in AUTO_BACKEND_ORDER:
            if candidate in registered and backend_availability(candidate)[0]:
                return candidate
        raise ValueError(f"backend=auto found none of {AUTO_BACKEND_ORDER} available")
    if name not in list_backends():
        raise ValueError(f"backend={name!r} is not registered; valid: auto, {', '.join(list_backends())}")
    ok, reason = backend_availability(name)
    if not ok:
        raise ValueError(f"backend={name} is not available here: {reason}. Use backend=auto or backend=dense_masked")
    return name


def validate_config(cfg: DictConfig) -> None:
    """Check values Hydra cannot (it checks keys and group options); raise ValueError naming the fix."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"invalid config: {message}")

    def positive_int(key: str, value, allow_none: bool = False) -> None:
        if allow_none and value is None:
            return
        need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{key} must be an integer > 0{' or null' if allow_none else ''}, got {value!r}")

    positive_int("batch_size", cfg.batch_size)
    positive_int("accum_iter", cfg.accum_iter)
    positive_int("epochs", cfg.epochs)
    positive_int("max_steps", cfg.max_steps, allow_none=True)
    positive_int("log_every_steps", cfg.log_every_steps)
    positive_int("checkpoint.every_steps", cfg.checkpoint.every_steps)
    need(isinstance(cfg.checkpoint.keep_last, int) and cfg.checkpoint.keep_last >= 0,
         f"checkpoint.keep_last must be an integer >= 0 (0 keeps all), got {cfg.checkpoint.keep_last!r}")
    need(isinstance(cfg.recon.every_steps, int) and cfg.recon.every_steps >= 0,
         f"recon.every_steps must be an integer >= 0 (0: only at the end), got {cfg.recon.every_steps!r}")
    need(isinstance(cfg.recon.num_images, int) and cfg.recon.num_images >= 0,
         f"recon.num_images must be an integer >= 0, got {cfg.recon.num_images!r}")
    need(isinstance(cfg.mask_ratio, (int, float)) and 0 < cfg.mask_ratio < 1,
         f"mask_ratio must be in (0, 1), got {cfg.mask_ratio!r} (the paper uses 0.6)")
    need(str(cfg.amp) in ("auto", "True", "False", "true", "false"), f"amp must be auto, true or false, got {cfg.amp!r}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.clip_grad is None or (isinstance(cfg.clip_grad, (int, float)) and cfg.clip_grad > 0),
         f"clip_grad must be > 0 or null, got {cfg.clip_grad!r}")
    need(cfg.model.variant in VARIANTS, f"model.variant must be one of {', '.join(VARIANTS)}, got {cfg.model.variant!r}")
    need(isinstance(cfg.model.drop_path_rate, (int, float)) and 0 <= cfg.model.drop_path_rate < 1,
         f"model.drop_path_rate must be in [0, 1), got {cfg.model.drop_path_rate!r}")
    need(cfg.backend.name == "auto" or cfg.backend.name in list_backends(),
         f"backend.name must be auto or one of {', '.join(list_backends())}, got {cfg.backend.name!r}")
    size = cfg.data.size
    need(isinstance(size, int) and size > 0 and size % 32 == 0,
         f"data.size must be a positive multiple of 32 (the patch size), got {size!r}")
    need(isinstance(cfg.data.num_workers, int) and cfg.data.num_workers >= 0,
         f"data.num_workers must be an integer >= 0, got {cfg.data.num_workers!r}")
    lo, hi = cfg.data.scale
    need(0 < lo <= hi <= 1, f"data.scale must satisfy 0 < min <= max <= 1, got [{lo}, {hi}]")
    need(0 <= cfg.data.hflip <= 1, f"data.hflip must be a probability in [0, 1], got {cfg.data.hflip!r}")
    need(cfg.data.name in ("builtin", "imagefolder"), f"data.name must be builtin or imagefolder, got {cfg.data.name!r}")
    optim = cfg.optim
    need(optim.name == "adamw", f"optim.name must be adamw, got {optim.name!r}")
    need(isinstance(optim.blr, (int, float)) and optim.blr > 0, f"optim.blr must be > 0, got {optim.blr!r}")
    need(optim.lr is None or (isinstance(optim.lr, (int, float)) and optim.lr > 0),
         f"optim.lr must be > 0 or null (then lr = blr * effective_batch / 256), got {optim.lr!r}")
    need(optim.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {optim.weight_decay!r}")
    need(len(optim.betas) == 2 and all(0 <= b < 1 for b in optim.betas),
         f"optim.betas must be two numbers in [0, 1), got {list(optim.betas)}")
    need(optim.eps > 0, f"optim.eps must be > 0, got {optim.eps!r}")
    sched = cfg.sched
    need(sched.name == "warmup_cosine", f"sched.name must be warmup_cosine, got {sched.name!r}")
    need(sched.warmup_epochs >= 0, f"sched.warmup_epochs must be >= 0, got {sched.warmup_epochs!r}")
    need(sched.warmup_steps is None or (isinstance(sched.warmup_steps, int) and sched.warmup_steps >= 0),
         f"sched.warmup_steps must be an integer >= 0 or null, got {sched.warmup_steps!r}")
    need(sched.min_lr >= 0, f"sched.min_lr must be >= 0, got {sched.min_lr!r}")
    need(cfg.logger.name in ("wandb", "none"), f"logger.name must be wandb or none, got {cfg.logger.name!r}")


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


# -- the run -----------------------------------------------------------------------------


def run_pretrain(cfg: DictConfig, run_dir: str | Path | None = None) -> PretrainResult:
    """Run (or continue) one pretraining job; returns where its outputs are."""
    validate_config(cfg)
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    dist_info = init_distributed(cfg.device)
    if dist_info.enabled:  # ranks may resolve ${now:...} in different seconds: rank 0's folder wins
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        return _train(cfg, run_dir, dist_info)
    finally:
        cleanup_distributed()


def _amp_enabled(cfg: DictConfig, device: torch.device, backend) -> bool:
    amp = str(cfg.amp).lower()
    if amp == "auto":
        return device.type == "cuda" and "cuda" in backend.autocast_devices
    if amp == "true" and device.type not in backend.autocast_devices:
        raise ValueError(f"amp=true but backend {backend.name} has no autocast on {device.type}; use amp=false")
    return amp == "true"


def _train(cfg: DictConfig, run_dir: Path, di: DistInfo) -> PretrainResult:
    backend_name = resolve_backend(cfg.backend.name)
    cfg = OmegaConf.merge(cfg, {"output_dir": str(run_dir)})  # the resolved values go beside checkpoints
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    ckpt_dir = run_dir / "checkpoints"

    seed_everything(cfg.seed + di.rank)
    model = create_model(
        f"fcmae_convnextv2_{cfg.model.variant}", backend=backend_name, mask_ratio=cfg.mask_ratio,
        norm_pix_loss=cfg.model.norm_pix_loss, decoder_dim=cfg.model.decoder_dim,
        decoder_depth=cfg.model.decoder_depth, drop_path_rate=cfg.model.drop_path_rate,
    ).to(di.device)
    amp = _amp_enabled(cfg, di.device, model.backend)

    dataset = build_dataset(cfg.data)
    sampler = ResumableDistributedSampler(dataset, num_replicas=di.world_size, rank=di.rank, seed=cfg.seed)
    effective_batch = cfg.batch_size * di.world_size * cfg.accum_iter
    steps_per_epoch = sampler.num_samples // (cfg.batch_size * cfg.accum_iter)
    if steps_per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} images, fewer than one effective batch of {effective_batch} "
                         f"(batch_size {cfg.batch_size} x {di.world_size} processes x accum_iter {cfg.accum_iter}); "
                         f"lower batch_size / accum_iter or add images")
    total_steps = cfg.epochs * steps_per_epoch
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = cfg.sched.warmup_steps if cfg.sched.warmup_steps is not None else round(
        cfg.sched.warmup_epochs * steps_per_epoch)
    if warmup_steps > total_steps:
        raise ValueError(f"warmup ({warmup_steps} steps) is longer than the whole schedule ({total_steps} steps = "
                         f"{cfg.epochs} epochs x {steps_per_epoch}); lower sched.warmup_epochs or raise epochs")
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256

    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, cfg.optim.weight_decay), lr=peak_lr,
                                  betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)

    step = 0
    resume_path = resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        step = _load_state(resume_path, model, optimizer, di)
    train_model = model
    if di.enabled:
        train_model = DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    logger = RunLogger(
        run_dir, enabled=di.is_main,
        wandb_cfg=OmegaConf.to_container(cfg.logger) if cfg.logger.name == "wandb" else None,
        config=OmegaConf.to_container(cfg, resolve=True), total_steps=run_steps, initial_step=step,
        progress=cfg.logger.progress,
    )
    if di.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        logger.write(
            f"pretrain: fcmae_convnextv2_{cfg.model.variant}, backend {backend_name}, {di.device} x {di.world_size}, "
            f"amp {'bf16' if amp else 'off'}, {len(dataset)} images at {cfg.data.size}px, effective batch "
            f"{effective_batch}, lr {peak_lr:.3g}, {steps_per_epoch} steps/epoch, steps {step} -> {run_steps} "
            f"of {total_steps}" + (f", resumed from {resume_path}" if resume_path else "")
        )
        empty = len(getattr(dataset, "empty_files", []))
        if empty:
            logger.write(f"skipped {empty} zero-byte image file(s) under {cfg.data.root}")

    recon_imgs, recon_mask = _fixed_recon_batch(dataset, cfg, di.device)
    losses: list[float] = []
    skipped_here = torch.zeros((), dtype=torch.long, device=di.device)
    last_ckpt = find_latest(ckpt_dir)
    recon_path = None
    num_patches = (cfg.data.size // 32) ** 2
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

    def save(at_step: int) -> None:
        nonlocal last_ckpt
        rng = capture_rng_state()
        if di.enabled:  # every rank's RNG goes into rank 0's checkpoint
            gathered = [None] * di.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        if di.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at_step,
                     "epoch": at_step // steps_per_epoch, "rng": rng, "world_size": di.world_size,
                     "config": config_yaml}
            last_ckpt = save_checkpoint(ckpt_dir, at_step, state, config_yaml, keep_last=cfg.checkpoint.keep_last)
        barrier()

    def reconstruct(at_step: int) -> None:
        nonlocal recon_path
        if not di.is_main or recon_imgs is None:
            return
        with torch.autocast(di.device.type, dtype=torch.bfloat16, enabled=amp):
            path = run_dir / "reconstructions" / f"step-{at_step:08d}.png"
            save_reconstruction(model, recon_imgs, recon_mask, path)
        latest = run_dir / "reconstruction.png"
        latest.write_bytes(path.read_bytes())
        recon_path = latest
        logger.log_image("reconstruction", path, at_step, caption="original | masked | prediction | pasted")

    loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
                        pin_memory=di.device.type == "cuda",
                        # its own generator: starting an epoch must not draw from the global RNG
                        # (that would make the global stream depend on where a run was resumed)
                        generator=torch.Generator().manual_seed(cfg.seed))
    try:
        while step < run_steps:
            epoch = step // steps_per_epoch
            micro_in_epoch = (step % steps_per_epoch) * cfg.accum_iter
            sampler.set_epoch(epoch, start=micro_in_epoch * cfg.batch_size)
            batches = iter(loader)  # the sampler runs in this process: a new epoch reaches persistent workers
            epoch_end = (epoch + 1) * steps_per_epoch
            while step < min(epoch_end, run_steps):
                set_lr(optimizer, warmup_cosine_lr(step, total_steps, warmup_steps, peak_lr, cfg.sched.min_lr))
                step_loss = torch.zeros((), device=di.device)
                for micro in range(cfg.accum_iter):
                    batch = next(batches)
                    skipped_here += batch["skipped"].sum().to(di.device)
                    imgs = batch["image"].to(di.device, non_blocking=True)
                    mask = masks_from_seeds(batch["seed"], num_patches, cfg.mask_ratio).to(di.device)
                    sync = micro == cfg.accum_iter - 1 or not di.enabled
                    with (train_model.no_sync() if not sync else contextlib.nullcontext()):
                        with torch.autocast(di.device.type, dtype=torch.bfloat16, enabled=amp):
                            loss, _, _ = train_model(imgs, mask=mask)
                        global_loss = all_reduce_mean(loss.detach().float())
                        if not torch.isfinite(global_loss):
                            raise NonFiniteLossError(
                                f"loss is {global_loss.item()} at step {step} (epoch {epoch}, micro-batch {micro}); "
                                f"stopped before updating the weights. Last good checkpoint: "
                                f"{last_ckpt or 'none written yet'}. Try a lower optim.blr, amp=false or clip_grad=1.0, "
                                f"then resume=auto")
                        (loss / cfg.accum_iter).backward()
                    step_loss += global_loss / cfg.accum_iter
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_value = step_loss.item()
                losses.append(loss_value)
                window_loss += loss_value
                window_steps += 1
                lr = optimizer.param_groups[0]["lr"]
                if step % cfg.log_every_steps == 0 or step == run_steps:
                    elapsed = time.perf_counter() - window_start
                    img_per_s = window_steps * effective_batch / max(elapsed, 1e-9)
                    skipped_total = int(all_reduce_sum(skipped_here).item())
                    logger.log({"epoch": step / steps_per_epoch, "loss": window_loss / window_steps, "lr": lr,
                                "img_per_s": img_per_s, "skipped_files": skipped_total}, step)
                    logger.progress(0, loss=window_loss / window_steps, lr=lr, img_s=round(img_per_s, 1))
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                logger.progress(1)
                if step % cfg.checkpoint.every_steps == 0 or step == run_steps:
                    save(step)
                if (cfg.recon.every_steps and step % cfg.recon.every_steps == 0) or step == run_steps:
                    reconstruct(step)
            del batches
        if resume_path is not None and not losses and di.is_main:
            logger.write(f"nothing to do: the checkpoint is already at step {step} of {run_steps}")
            reconstruct(step)
        skipped_total = int(all_reduce_sum(skipped_here).item()) + len(getattr(dataset, "empty_files", []))
        logger.summary({"final_loss": losses[-1] if losses else math.nan, "skipped_files": skipped_total})
    finally:
        logger.close()

    metrics_path = run_dir / "metrics.jsonl"
    if di.is_main:
        print(f"\nrun directory:  {run_dir}\ncheckpoint:     {last_ckpt}\nmetrics:        {metrics_path}\n"
              f"reconstruction: {recon_path}" + (f"\nskipped files:  {skipped_total}" if skipped_total else "")
              + (f"\nwandb:          {run_dir / 'wandb'} ({cfg.logger.mode}; `wandb sync` uploads an offline run)"
                 if cfg.logger.name == "wandb" else ""),
              flush=True)
    return PretrainResult(run_dir=run_dir, checkpoint=last_ckpt, metrics=metrics_path, reconstruction=recon_path,
                          steps=step, losses=losses, skipped_files=skipped_total)


def _fixed_recon_batch(dataset, cfg: DictConfig, device: torch.device):
    """The same images and masks at every reconstruction of a run (and across resumes)."""
    n = min(cfg.recon.num_images, len(dataset))
    if n == 0:
        return None, None
    items = [dataset[(i, cfg.seed * 7919 + i)] for i in range(n)]
    imgs = torch.stack([it["image"] for it in items]).to(device)
    mask = masks_from_seeds(torch.tensor([cfg.seed * 7919 + i for i in range(n)]), (cfg.data.size // 32) ** 2,
                            cfg.mask_ratio).to(device)
    return imgs, mask


def _load_state(path: Path, model, optimizer, di: DistInfo) -> int:
    state = load_checkpoint(path, map_location=di.device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit this model (was it written with another model=?): {e}") from e
    optimizer.load_state_dict(state["optimizer"])
    rng = state.get("rng") or []
    if len(rng) == di.world_size:
        restore_rng_state(rng[di.rank])
    elif di.is_main:
        print(f"warning: checkpoint written by {len(rng)} process(es), resuming on {di.world_size}: data order and "
              f"masks are unchanged, only dropout-like RNG streams restart", file=sys.stderr)
    return int(state["step"])


# -- entry point -------------------------------------------------------------------------


def main() -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
    def _app(cfg: DictConfig) -> None:
        run_pretrain(cfg, HydraConfig.get().runtime.output_dir)

    _app()
    return 0
