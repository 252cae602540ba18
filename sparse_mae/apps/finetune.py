"""`sparse-mae finetune [hydra overrides]`: fine-tune a dense ConvNeXt V2 classifier.

From a pretrained checkpoint (ours, or `sparse-mae import` output) or random init: the
encoder weights are loaded, the head is re-initialised. Recipe pieces (ConvNeXt V2 /
BEiT style): layer-wise lr decay, drop path, label smoothing, EMA of the weights,
optional mixup / cutmix, per-step warmup + cosine lr. Checkpoints, resume, metrics and
wandb go through the same sparse_mae.train machinery as pretraining.
"""
from __future__ import annotations

import contextlib
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from sparse_mae.apps.evaluate import build_split, confusion_png, evaluate_classifier
from sparse_mae.models import VARIANTS, create_model
from sparse_mae.train.checkpoint import find_latest, load_checkpoint, resolve_resume, save_checkpoint
from sparse_mae.train.distributed import DistInfo, all_reduce_mean, barrier, cleanup_distributed, init_distributed
from sparse_mae.train.metrics import RunLogger
from sparse_mae.train.optim import no_weight_decay
from sparse_mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from sparse_mae.train.sampler import ResumableDistributedSampler
from sparse_mae.train.schedule import set_lr, warmup_cosine_lr

CONFIG_MODULE = "sparse_mae_conf"
CONFIG_NAME = "finetune"
NUM_LAYER_IDS = 12  # ConvNeXt's layer-decay grouping: stem 0, stages 1..12, head 13


@dataclass
class FinetuneResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "top1", "top5", "loss", "weights"}

    @property
    def best_top1(self) -> float:
        return max((e["top1"] for e in self.evals), default=math.nan)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose(config_name=CONFIG_NAME, overrides=list(overrides or []))


# -- model -------------------------------------------------------------------------------

def layer_id(name: str) -> int:
    """Layer-decay group of a classifier parameter, as the ConvNeXt (V2) fine-tuning code groups
    them: stem 0; stages 0-1 and downsamples 1-2 -> stage+1; stage 2 blocks in threes -> 3..11;
    stage 3 and its downsample -> 12; head 13."""
    if name.startswith("stem."):
        return 0
    if m := re.match(r"stages\.(\d+)\.downsample\.", name):
        i = int(m[1])
        return i + 1 if i < 3 else NUM_LAYER_IDS
    if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name):
        i, j = int(m[1]), int(m[2])
        if i < 2:
            return i + 1
        if i == 2:
            return min(3 + j // 3, NUM_LAYER_IDS - 1)
        return NUM_LAYER_IDS
    return NUM_LAYER_IDS + 1  # head


def param_groups_layer_decay(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """One group per (layer id, decay or not), with `lr_scale` = layer_decay ** (13 - id)
    (read by train.schedule.set_lr)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lid, decay = layer_id(name), not no_weight_decay(name, param)
        group = groups.setdefault((lid, decay), {
            "params": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (NUM_LAYER_IDS + 1 - lid), "layer_id": lid})
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def load_pretrained(model: torch.nn.Module, path: str, variant: str) -> dict:
    """Encoder weights from our FCMAE or classifier checkpoint; the head stays freshly initialised."""
    from sparse_mae.convert import encoder_part, inspect_state_dict, read_state_dict

    sd, meta = read_state_dict(path)
    spec = inspect_state_dict(sd, "sparse_mae", source=f"pretrained checkpoint {path}", strict=True,
                              variant=None)
    if spec.variant != variant:
        raise ValueError(f"pretrained={path} is a convnextv2_{spec.variant} checkpoint but model={variant}; "
                         f"pass model={spec.variant}")
    enc, _ = encoder_part(sd, spec)
    enc = {k: v for k, v in enc.items() if not k.startswith("head.")}  # re-initialised for the new task
    missing, unexpected = model.load_state_dict(enc, strict=False)
    if unexpected or any(not k.startswith("head.") for k in missing):
        raise ValueError(f"pretrained={path}: missing {missing}, unexpected {unexpected}")
    return {"source_kind": spec.kind, "source_step": meta.get("step")}


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (kept in fp32)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema.decay must be in (0, 1), got {decay}")
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for ema_v, v in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_v.dtype.is_floating_point:
                ema_v.lerp_(v.detach(), 1.0 - self.decay)
            else:
                ema_v.copy_(v)


# -- loss and mixing ---------------------------------------------------------------------

def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((labels.numel(), num_classes), off, device=labels.device).scatter_(
        1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(imgs: torch.Tensor, targets: torch.Tensor, cfg: DictConfig, g: torch.Generator):
    """Mixup (blend with the batch reversed) or CutMix (paste a box from it); targets mixed by area.
    Returns (imgs, targets) unchanged when both alphas are 0 or the batch is not drawn."""
    mix, cut = cfg.mixup_alpha > 0, cfg.cutmix_alpha > 0
    if not (mix or cut) or float(torch.rand(1, generator=g)) >= cfg.prob:
        return imgs, targets
    use_cut = cut and (not mix or float(torch.rand(1, generator=g)) < cfg.switch_prob)
    alpha = cfg.cutmix_alpha if use_cut else cfg.mixup_alpha
    lam = _beta(alpha, g)
    flipped = imgs.flip(0)
    if use_cut:
        h, w = imgs.shape[-2:]
        ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, (1,), generator=g)), int(torch.randint(w, (1,), generator=g))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        imgs = imgs.clone()
        imgs[:, :, y0:y1, x0:x1] = flipped[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        imgs = imgs * lam + flipped * (1.0 - lam)
    return imgs, targets * lam + targets.flip(0) * (1.0 - lam)


def _beta(alpha: float, g: torch.Generator) -> float:
    """Beta(alpha, alpha) from the given generator (torch.distributions has no generator arg)."""
    # Beta(a, a) = X / (X + Y) with X, Y ~ Gamma(a), and Gamma(a) = Gamma(a + 1) * U^(1/a)
    u = torch.rand(2, generator=g).clamp_min(1e-12)
    x = _gamma1p(alpha, g) * float(u[0]) ** (1 / alpha)
    y = _gamma1p(alpha, g) * float(u[1]) ** (1 / alpha)
    return x / (x + y)


def _gamma1p(alpha: float, g: torch.Generator) -> float:
    """Gamma(alpha + 1) sample (shape >= 1) by Marsaglia-Tsang, from generator g."""
    d = alpha + 1.0 - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = float(torch.randn(1, generator=g))
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = float(torch.rand(1, generator=g))
        if math.log(max(u, 1e-300)) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


# -- config checks -----------------------------------------------------------------------

def validate_config(cfg: DictConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(f"invalid config: {message}")

    for key in ("batch_size", "accum_iter", "epochs", "log_every_steps", "eval_every_epochs"):
        v = OmegaConf.select(cfg, key)
        need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"{key} must be an integer > 0, got {v!r}")
    need(cfg.max_steps is None or (isinstance(cfg.max_steps, int) and cfg.max_steps > 0),
         f"max_steps must be an integer > 0 or null, got {cfg.max_steps!r}")
    need(cfg.model.variant in VARIANTS, f"model.variant must be one of {', '.join(VARIANTS)}, got {cfg.model.variant!r}")
    need(0 <= cfg.drop_path < 1, f"drop_path must be in [0, 1), got {cfg.drop_path!r}")
    need(0 < cfg.layer_decay <= 1, f"layer_decay must be in (0, 1] (1 = no decay), got {cfg.layer_decay!r}")
    need(0 <= cfg.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {cfg.label_smoothing!r}")
    need(0 < cfg.ema.decay < 1, f"ema.decay must be in (0, 1), got {cfg.ema.decay!r}")
    need(cfg.mixup.mixup_alpha >= 0 and cfg.mixup.cutmix_alpha >= 0, "mixup.mixup_alpha / cutmix_alpha must be >= 0")
    need(0 <= cfg.mixup.prob <= 1 and 0 <= cfg.mixup.switch_prob <= 1, "mixup.prob / switch_prob must be in [0, 1]")
    need(cfg.optim.lr is None or cfg.optim.lr > 0, f"optim.lr must be > 0 or null, got {cfg.optim.lr!r}")
    need(cfg.optim.blr > 0, f"optim.blr must be > 0, got {cfg.optim.blr!r}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.logger.name in ("wandb", "none"), f"logger.name must be wandb or none, got {cfg.logger.name!r}")
    need(cfg.clip_grad is None or cfg.clip_grad > 0, f"clip_grad must be > 0 or null, got {cfg.clip_grad!r}")


# -- the run -----------------------------------------------------------------------------

def run_finetune(cfg: DictConfig, run_dir: str | Path | None = None) -> FinetuneResult:
    validate_config(cfg)
    run_dir = Path(run_dir if run_dir is not None else cfg.output_dir)
    di = init_distributed(cfg.device)
    if di.enabled:
        import torch.distributed as dist

        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    try:
        return _train(cfg, run_dir, di)
    finally:
        cleanup_distributed()


def _train(cfg: DictConfig, run_dir: Path, di: DistInfo) -> FinetuneResult:
    cfg = OmegaConf.merge(cfg, {"output_dir": str(run_dir)})
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    ckpt_dir = run_dir / "checkpoints"
    amp = str(cfg.amp).lower() == "true" or (str(cfg.amp).lower() == "auto" and di.device.type == "cuda")

    train_set, classes = build_split(cfg.data, "train")
    val_set, _ = build_split(cfg.data, "val", classes)
    num_classes = len(classes)

    seed_everything(cfg.seed + di.rank)
    model = create_model(f"convnextv2_{cfg.model.variant}", num_classes=num_classes, drop_path_rate=cfg.drop_path)
    source = {"source_kind": "random init"}
    if cfg.pretrained:
        source = load_pretrained(model, cfg.pretrained, cfg.model.variant)
    model.to(di.device)
    ema = ModelEma(model, cfg.ema.decay) if cfg.ema.enabled else None

    sampler = ResumableDistributedSampler(train_set, num_replicas=di.world_size, rank=di.rank, seed=cfg.seed)
    effective_batch = cfg.batch_size * di.world_size * cfg.accum_iter
    steps_per_epoch = sampler.num_samples // (cfg.batch_size * cfg.accum_iter)
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_set)} training images are fewer than one effective batch of {effective_batch}; "
                         f"lower batch_size / accum_iter or add images")
    total_steps = cfg.epochs * steps_per_epoch
    run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    warmup_steps = cfg.sched.warmup_steps if cfg.sched.warmup_steps is not None else round(
        cfg.sched.warmup_epochs * steps_per_epoch)
    warmup_steps = min(warmup_steps, total_steps)
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.blr * effective_batch / 256
    optimizer = torch.optim.AdamW(param_groups_layer_decay(model, cfg.optim.weight_decay, cfg.layer_decay),
                                  lr=peak_lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)

    step, evals = 0, []
    resume_path = resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        state = load_checkpoint(resume_path, map_location=di.device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        rng = state.get("rng") or []
        if len(rng) == di.world_size:
            restore_rng_state(rng[di.rank])
        step, evals = int(state["step"]), list(state.get("evals") or [])
    train_model = model
    if di.enabled:
        train_model = DistributedDataParallel(model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    logger = RunLogger(run_dir, enabled=di.is_main,
                       wandb_cfg=OmegaConf.to_container(cfg.logger) if cfg.logger.name == "wandb" else None,
                       config=OmegaConf.to_container(cfg, resolve=True), total_steps=run_steps, initial_step=step,
                       progress=cfg.logger.progress)
    if di.is_main:
        (run_dir / "config.yaml").write_text(config_yaml)
        logger.write(f"finetune: convnextv2_{cfg.model.variant} from {cfg.pretrained or 'random init'}, "
                     f"{num_classes} classes, {len(train_set)} train / {len(val_set)} val images at {cfg.data.size}px, "
                     f"effective batch {effective_batch}, lr {peak_lr:.3g}, layer decay {cfg.layer_decay}, "
                     f"steps {step} -> {run_steps} of {total_steps}"
                     + (f", resumed from {resume_path}" if resume_path else ""))
    # its own generator: iterating must not draw from the global RNG (drop path), or evaluating
    # would change the training stream and a resumed run would diverge
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                            generator=torch.Generator().manual_seed(cfg.seed))
    metadata = {"variant": cfg.model.variant, "num_classes": num_classes, "classes": classes,
                "pretrained": str(cfg.pretrained) if cfg.pretrained else None, "kind": "classifier"}
    last_ckpt = find_latest(ckpt_dir)
    losses: list[float] = []
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()

    def evaluate(at_step: int) -> None:
        if not di.is_main:
            return
        candidates = [("model", model)] + ([("ema", ema.module)] if ema is not None and cfg.ema.evaluate else [])
        record = {}
        for name, net in candidates:
            r = evaluate_classifier(net, val_loader, num_classes, di.device, amp)
            evals.append({"step": at_step, "weights": name, "top1": r["top1"], "top5": r["top5"], "loss": r["loss"]})
            record |= {f"val/{name}/top1": r["top1"], f"val/{name}/top5": r["top5"], f"val/{name}/loss": r["loss"]}
            confusion_png(r["confusion"], classes, run_dir / f"confusion_{name}.png",
                          title=f"step {at_step} {name}: top-1 {r['top1']:.2f}%")
        logger.log(record, at_step)
        logger.write(f"step {at_step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items() if "top1" in k))

    def save(at_step: int) -> None:
        nonlocal last_ckpt
        rng = [capture_rng_state()]
        if di.enabled:
            import torch.distributed as dist

            rng = [None] * di.world_size
            dist.all_gather_object(rng, capture_rng_state())
        if di.is_main:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": at_step,
                     "rng": rng, "evals": evals, "config": config_yaml, "metadata": metadata}
            if ema is not None:
                state["ema"] = ema.module.state_dict()
            last_ckpt = save_checkpoint(ckpt_dir, at_step, state, config_yaml, keep_last=cfg.checkpoint.keep_last)
        barrier()

    eval_every = cfg.eval_every_epochs * steps_per_epoch
    try:
        while step < run_steps:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, start=(step % steps_per_epoch) * cfg.accum_iter * cfg.batch_size)
            loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=True,
                                num_workers=cfg.data.num_workers, pin_memory=di.device.type == "cuda",
                                generator=torch.Generator().manual_seed(cfg.seed))
            batches = iter(loader)
            while step < min((epoch + 1) * steps_per_epoch, run_steps):
                set_lr(optimizer, warmup_cosine_lr(step, total_steps, warmup_steps, peak_lr, cfg.sched.min_lr))
                step_loss = torch.zeros((), device=di.device)
                for micro in range(cfg.accum_iter):
                    batch = next(batches)
                    imgs = batch["image"].to(di.device, non_blocking=True)
                    targets = soft_targets(batch["label"].to(di.device), num_classes, cfg.label_smoothing)
                    # mixing drawn from (seed, step, micro): a resumed run mixes as the uninterrupted one
                    mix_generator = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 64 + micro)
                    imgs, targets = mix_batch(imgs, targets, cfg.mixup, mix_generator)
                    sync = micro == cfg.accum_iter - 1 or not di.enabled
                    with (train_model.no_sync() if not sync else contextlib.nullcontext()):
                        with torch.autocast(di.device.type, dtype=torch.bfloat16, enabled=amp):
                            logits = train_model(imgs)
                        loss = F.cross_entropy(logits.float(), targets)
                        global_loss = all_reduce_mean(loss.detach())
                        if not torch.isfinite(global_loss):
                            raise FloatingPointError(
                                f"loss is {global_loss.item()} at step {step}; stopped before updating the weights "
                                f"(last checkpoint: {last_ckpt}). Lower optim.blr or set clip_grad=1.0, then resume=auto")
                        (loss / cfg.accum_iter).backward()
                    step_loss += global_loss / cfg.accum_iter
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                step += 1
                losses.append(step_loss.item())
                window_loss, window_steps = window_loss + losses[-1], window_steps + 1
                if step % cfg.log_every_steps == 0 or step == run_steps:
                    lr = max(g["lr"] for g in optimizer.param_groups)
                    img_per_s = window_steps * effective_batch / max(time.perf_counter() - window_start, 1e-9)
                    logger.log({"epoch": step / steps_per_epoch, "loss": window_loss / window_steps, "lr": lr,
                                "img_per_s": img_per_s}, step)
                    logger.progress(0, loss=window_loss / window_steps, lr=lr)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                logger.progress(1)
                if step % eval_every == 0 or step == run_steps:
                    evaluate(step)
                if step % cfg.checkpoint.every_steps == 0 or step == run_steps:
                    save(step)
            del batches, loader
        if di.is_main and evals:
            best = max(evals, key=lambda e: e["top1"])
            logger.summary({"best_top1": best["top1"], "best_weights": best["weights"]})
    finally:
        logger.close()
    if di.is_main:
        best = max(evals, key=lambda e: e["top1"]) if evals else None
        print(f"\nrun directory: {run_dir}\ncheckpoint:    {last_ckpt}\nsource:        {source['source_kind']}"
              + (f"\nbest val top-1 {best['top1']:.2f}% ({best['weights']} weights, step {best['step']})" if best else ""),
              flush=True)
    return FinetuneResult(run_dir=run_dir, checkpoint=last_ckpt, metrics=run_dir / "metrics.jsonl", steps=step,
                          losses=losses, evals=evals)


def main() -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name=CONFIG_NAME)
    def _app(cfg: DictConfig) -> None:
        try:
            run_finetune(cfg, HydraConfig.get().runtime.output_dir)
        except (ValueError, FileNotFoundError) as e:
            print(f"sparse-mae finetune: error: {e}", file=sys.stderr)
            sys.exit(2)

    _app()
    return 0
