"""`sparse-mae eval ckpt=PATH`: top-1 / top-5 on the val split and a confusion-matrix PNG
(the evaluation itself: sparse_mae.train.evaluation, shared with fine-tuning)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.apps.app import compose, interruptible, tool_main
from sparse_mae.data.build import labelled_split
from sparse_mae.data.loader import make_loader
from sparse_mae.train.evaluation import confusion_png, evaluate_classifier
from sparse_mae.train.signals import StopRequest, ignore_in_worker


def load_classifier(path: str | os.PathLike, use_ema: bool = True):
    """Our classifier checkpoint (finetune step-*.pt with 'model'/'ema', an export or an import)
    -> (model, class names or None, which weights)."""
    from sparse_mae.convert import build_from_state_dict, inspect_state_dict, read_state_dict
    from sparse_mae.train.checkpoint import guard_checkpoint_file

    path = guard_checkpoint_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True) if Path(path).suffix != ".safetensors" else {}
    which = "model"
    if use_ema and isinstance(state.get("ema"), dict):
        sd, which = state["ema"], "ema"
    else:
        sd, _ = read_state_dict(path)
    spec = inspect_state_dict(sd, "sparse_mae", source=f"checkpoint {path}")
    if spec.kind != "classifier" or not spec.num_classes:
        raise ValueError(f"checkpoint {path} is {spec.describe()}; eval needs a classifier with a head "
                         f"(fine-tune it first: sparse-mae finetune pretrained={path})")
    classes = (state.get("metadata") or {}).get("classes")
    return build_from_state_dict(sd, spec), classes, which


def compose_eval_config(overrides: list[str]) -> DictConfig:
    return compose("eval", overrides)


def run_eval(cfg: DictConfig, stop: StopRequest | None = None) -> dict:
    from sparse_mae.train.distributed import resolve_device

    device = resolve_device(cfg.device)
    model, classes, which = load_classifier(cfg.ckpt, cfg.use_ema)
    dataset, data_classes = labelled_split(cfg.data, "val", classes)
    if classes and list(classes) != list(data_classes):  # labels beyond the head made an IndexError
        raise ValueError(f"the checkpoint's classes {list(classes)[:10]} are not the val data's "
                         f"{list(data_classes)[:10]}; evaluate on the data it was fine-tuned on")
    classes = classes or data_classes
    if len(classes) != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the val data {len(classes)}; "
                         f"evaluate on the data it was fine-tuned on")
    loader = make_loader(dataset, cfg.batch_size, num_workers=cfg.data.num_workers, device=device,
                         worker_init_fn=ignore_in_worker(stop.signals if stop else []))
    result = evaluate_classifier(model.to(device), loader, len(classes), device, stop=stop)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent
    png = confusion_png(result["confusion"], classes, out / "confusion_matrix.png",
                        title=f"{Path(cfg.ckpt).name} ({which}): top-1 {result['top1']:.2f}%")
    summary = {k: result[k] for k in ("top1", "top5", "loss", "count", "skipped")} | {
        "weights": which, "checkpoint": str(cfg.ckpt), "classes": classes,
        "confusion": result["confusion"].tolist()}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    return summary | {"png": png}


def _run_and_print(cfg: DictConfig, stop: StopRequest) -> int:
    summary = run_eval(cfg, stop)
    print(f"{summary['checkpoint']} ({summary['weights']} weights) on {summary['count']} val images: "
          f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  loss {summary['loss']:.4f}"
          + (f"  ({summary['skipped']} damaged samples left out)" if summary["skipped"] else ""))
    print(f"confusion matrix: {summary['png']}")
    return 0


def main() -> int:
    return tool_main("eval", interruptible("eval", _run_and_print))
