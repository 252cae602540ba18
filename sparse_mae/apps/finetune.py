"""`sparse-mae finetune [hydra overrides]`: fine-tune a dense ConvNeXt V2 classifier
(schema: config.FinetuneConfig).

From pretrained weights (ours, an import, or any layout `import` reads) or random init:
the encoder weights are loaded, the head is re-initialised. Recipe pieces (ConvNeXt V2 /
BEiT style): layer-wise lr decay, drop path, label smoothing, EMA of the weights,
optional mixup / cutmix. The app is the loss and the hooks (evaluation, EMA); the step
loop, checkpoints, resume and the non-finite policy are sparse_mae.train's engine, as
for pretraining.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from sparse_mae.apps.app import compose, hydra_main
from sparse_mae.apps.evaluate import build_split, confusion_png, evaluate_classifier
from sparse_mae.models import create_model
from sparse_mae.train.distributed import DistInfo
from sparse_mae.train.engine import Run, RunResult, TrainTask, resolve_amp, train
from sparse_mae.train.optim import no_weight_decay

NUM_LAYER_IDS = 12  # ConvNeXt's layer-decay grouping: stem 0, stages 1..12, head 13


@dataclass
class FinetuneResult(RunResult):
    evals: list[dict] = field(default_factory=list)  # {"step", "top1", "top5", "loss", "weights"}

    @property
    def best_top1(self) -> float:
        return max((e["top1"] for e in self.evals), default=math.nan)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae finetune <overrides>` would run (for tests and notebooks)."""
    return compose("finetune", overrides)


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


def load_pretrained(model: torch.nn.Module, path: str, variant: str, fmt: str = "auto") -> str:
    """Encoder weights from any layout `import` reads; the head stays freshly initialised."""
    from sparse_mae.convert.starting_weights import load_starting_weights

    return load_starting_weights(model, path, fmt, variant=variant, option="pretrained")


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


# -- the task ----------------------------------------------------------------------------

class FinetuneTask(TrainTask):
    name = "finetune"

    def __init__(self, cfg: DictConfig, di: DistInfo):
        self.cfg, self.device, self.is_main = cfg, di.device, di.is_main
        self.amp = resolve_amp(cfg.amp, di.device)
        self.dataset, self.classes = build_split(cfg.data, "train")
        self.val_set, _ = build_split(cfg.data, "val", self.classes)
        self.num_classes = len(self.classes)
        self.model = create_model(f"convnextv2_{cfg.model.variant}", num_classes=self.num_classes,
                                  drop_path_rate=cfg.model.drop_path_rate).to(di.device)
        self.ema = ModelEma(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        self.source = "random init"
        self.evals: list[dict] = []
        # its own generator: iterating must not draw from the global RNG (drop path), or
        # evaluating would change the training stream and a resumed run would diverge
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers,
                                     generator=torch.Generator().manual_seed(cfg.seed))
        self.metadata = {"variant": str(cfg.model.variant), "num_classes": self.num_classes, "classes": self.classes,
                         "pretrained": str(cfg.pretrained) if cfg.pretrained else None, "kind": "classifier"}

    def describe(self) -> str:
        cfg = self.cfg
        return (f"convnextv2_{cfg.model.variant} from {cfg.pretrained or 'random init'}, {self.num_classes} classes, "
                f"{len(self.val_set)} val images at {cfg.data.size}px, layer decay {cfg.layer_decay}")

    def init_weights(self, log) -> None:
        if self.cfg.pretrained:
            self.source = load_pretrained(self.model, self.cfg.pretrained, str(self.cfg.model.variant),
                                          self.cfg.pretrained_format)
            log(f"pretrained: {self.source}")
            if self.ema is not None:  # the average starts from the loaded weights
                self.ema = ModelEma(self.model, self.cfg.ema.decay)

    def param_groups(self) -> list[dict]:
        return param_groups_layer_decay(self.model, self.cfg.optim.weight_decay, self.cfg.layer_decay)

    def loss(self, model, batch: dict, step: int, micro: int) -> torch.Tensor:
        targets = soft_targets(batch["label"], self.num_classes, self.cfg.label_smoothing)
        # mixing drawn from (seed, step, micro): a resumed run mixes as the uninterrupted one
        mix_generator = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 64 + micro)
        imgs, targets = mix_batch(batch["image"], targets, self.cfg.mixup, mix_generator)
        return F.cross_entropy(model(imgs).float(), targets)

    def after_optimizer_step(self, step: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def after_step(self, run: Run, step: int, last: bool) -> None:
        if run.dist.is_main and (step % (self.cfg.eval_every_epochs * run.steps_per_epoch) == 0 or last):
            self.evaluate(run, step)

    def evaluate(self, run: Run, step: int) -> None:
        candidates = [("model", self.model)]
        if self.ema is not None and self.cfg.ema.evaluate:
            candidates.append(("ema", self.ema.module))
        record = {}
        for name, net in candidates:
            r = evaluate_classifier(net, self.val_loader, self.num_classes, self.device, self.amp)
            self.evals.append({"step": step, "weights": name, "top1": r["top1"], "top5": r["top5"], "loss": r["loss"]})
            record |= {f"val/{name}/top1": r["top1"], f"val/{name}/top5": r["top5"], f"val/{name}/loss": r["loss"]}
            confusion_png(r["confusion"], self.classes, run.dir.path / f"confusion_{name}.png",
                          title=f"step {step} {name}: top-1 {r['top1']:.2f}%")
        run.logger.log(record, step)
        run.logger.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record.items() if "top1" in k))

    def state_dict(self) -> dict:
        state = {"evals": self.evals, "metadata": self.metadata}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        self.evals = list(state.get("evals") or [])

    def summary(self) -> dict:
        if not self.evals:
            return {}
        best = max(self.evals, key=lambda e: e["top1"])
        return {"best_top1": best["top1"], "best_weights": best["weights"]}


# -- the run -----------------------------------------------------------------------------

def run_finetune(cfg: DictConfig, run_dir: str | Path | None = None) -> FinetuneResult:
    result, task = train(cfg, FinetuneTask, run_dir)
    result = FinetuneResult(**vars(result), evals=task.evals)
    if task.is_main and result.evals:
        best = max(result.evals, key=lambda e: e["top1"])
        print(f"\nrun directory: {result.run_dir}\ncheckpoint:    {result.checkpoint}\nsource:        {task.source}"
              f"\nbest val top-1 {best['top1']:.2f}% ({best['weights']} weights, step {best['step']})", flush=True)
    return result


def main() -> int:
    return hydra_main("finetune", run_finetune)
