"""`sparse-mae finetune [hydra overrides]`: fine-tune a dense ConvNeXt V2 or ResNet classifier
(schema: config.apps.FinetuneConfig).

From pretrained weights (ours, an import, or any layout `import` reads) or random init:
the encoder weights are loaded, the head is re-initialised. Recipe pieces (ConvNeXt V2 /
BEiT style): layer-wise lr decay, drop path, label smoothing, EMA of the weights,
optional mixup / cutmix. The app is the loss and the hooks (evaluation, EMA); the step
loop, checkpoints, resume and the non-finite policy are sparse_mae.train's engine, as
for pretraining.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from sparse_mae.apps.app import compose, hydra_main
from sparse_mae.data.build import labelled_split
from sparse_mae.data.loader import make_loader
from sparse_mae.build import create_model
from sparse_mae.models import RESNET_VARIANTS, model_name
from sparse_mae.train.distributed import DistInfo
from sparse_mae.train.ema import ModelEma
from sparse_mae.train.amp import resolve_amp
from sparse_mae.train.engine import Run, RunResult, TrainTask, train
from sparse_mae.train.evaluation import confusion_png, evaluate_classifier
from sparse_mae.train.mixup import mix_batch, soft_targets
from sparse_mae.train.optim import param_groups_layer_decay
from sparse_mae.train.signals import ignore_in_worker, parse_signals


@dataclass
class FinetuneResult(RunResult):
    evals: list[dict] = field(default_factory=list)  # {"step", "top1", "top5", "loss", "weights"}

    @property
    def best_top1(self) -> float:
        return max((e["top1"] for e in self.evals), default=math.nan)


def compose_config(overrides: list[str] | None = None) -> DictConfig:
    """The config `sparse-mae finetune <overrides>` would run (for tests and notebooks)."""
    return compose("finetune", overrides)


# -- model ---------------------------------------------------------------------------------

def load_pretrained(model: torch.nn.Module, path: str, variant: str, fmt: str = "auto") -> str:
    """Encoder weights from any layout `import` reads; the head stays freshly initialised."""
    from sparse_mae.convert.starting_weights import load_starting_weights

    return load_starting_weights(model, path, fmt, variant=variant, option="pretrained")


# -- the task ----------------------------------------------------------------------------

class FinetuneTask(TrainTask):
    name = "finetune"

    def __init__(self, cfg: DictConfig, di: DistInfo):
        self.cfg, self.device, self.is_main = cfg, di.device, di.is_main
        self.amp = resolve_amp(cfg.amp, di.device)
        self.dataset, self.classes = labelled_split(cfg.data, "train")
        self.val_set, _ = labelled_split(cfg.data, "val", self.classes)
        self.num_classes = len(self.classes)
        variant = str(cfg.model.variant)
        self.model_name = model_name("resnet" if variant in RESNET_VARIANTS else "convnextv2", variant)
        # the ResNets have no stochastic depth (config.apps.FinetuneConfig.relations refuses a rate)
        depth = {} if variant in RESNET_VARIANTS else {"drop_path_rate": cfg.model.drop_path_rate}
        self.model = create_model(self.model_name, num_classes=self.num_classes, **depth).to(di.device)
        self.ema = ModelEma(self.model, cfg.ema.decay) if cfg.ema.enabled else None
        self.source = "random init"
        self.evals: list[dict] = []
        self.val_loader = make_loader(self.val_set, cfg.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
                                      worker_init_fn=ignore_in_worker(parse_signals(cfg.stop_signals)))
        self.metadata = {"variant": str(cfg.model.variant), "num_classes": self.num_classes, "classes": self.classes,
                         "pretrained": str(cfg.pretrained) if cfg.pretrained else None, "kind": "classifier"}

    def describe(self) -> str:
        cfg = self.cfg
        return (f"{self.model_name} from {cfg.pretrained or 'random init'}, {self.num_classes} classes, "
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
        mix_rng = np.random.default_rng((self.cfg.seed, step, micro))
        imgs, targets = mix_batch(batch["image"], targets, self.cfg.mixup, mix_rng)
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
        # every candidate first, then the records: an evaluation abandoned on a stop signal (or
        # failing) records nothing, and runs again whole after resume
        results = {name: evaluate_classifier(net, self.val_loader, self.num_classes, self.device, self.amp, run.stop)
                   for name, net in candidates}
        record = {}
        for name, r in results.items():
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
