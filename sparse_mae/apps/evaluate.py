"""`sparse-mae eval ckpt=PATH`: top-1 / top-5 on the val split and a confusion-matrix PNG.

Also the evaluation used by `sparse-mae finetune` (evaluate_classifier) and the labelled
datasets both apps read (build_split).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from sparse_mae.apps.app import compose, tool_main
from sparse_mae.data.imagefolder import LabelledImageFolderDataset


def build_split(data_cfg: DictConfig, split: str, classes: list[str] | None = None):
    """-> (dataset, class names) for split 'train' (random crops) or 'val' (centre crops)."""
    from sparse_mae.data.transforms import EvalTransform, TrainTransform

    size = data_cfg.size
    if not (isinstance(size, int) and size > 0 and size % 32 == 0):
        raise ValueError(f"data.size must be a positive multiple of 32, got {size!r}")
    if split == "train":
        transform = TrainTransform(size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
    else:
        transform = EvalTransform(size)
    if data_cfg.name == "builtin":
        from sparse_mae.data.builtin import CLASSES, BuiltinDataset

        count = data_cfg.num_train if split == "train" else data_cfg.num_val
        seed = data_cfg.seed if split == "train" else data_cfg.seed + 1  # val images never seen in training
        return BuiltinDataset(count, data_cfg.draw_size, transform, seed=seed), list(CLASSES)
    if data_cfg.name == "imagefolder":
        ds = LabelledImageFolderDataset(Path(data_cfg.root) / split, transform, classes)
        return ds, ds.classes
    raise ValueError(f"data.name must be builtin or imagefolder, got {data_cfg.name!r}")


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
                        amp: bool = False) -> dict:
    """-> {"top1", "top5", "loss", "count", "skipped", "confusion" (num_classes x num_classes, rows =
    truth)}. Items that stand in for an unreadable file ("skipped" > 0) are left out, so
    every readable image counts once and an unreadable one not at all."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = skipped = 0
    loss_sum, count = 0.0, 0
    k = min(5, num_classes)
    for batch in loader:
        keep = batch["skipped"] == 0
        skipped += int(batch["skipped"].sum())
        if not keep.any():
            continue
        imgs, labels = batch["image"][keep].to(device), batch["label"][keep].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(imgs)
        logits = logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        topk = logits.topk(k, dim=1).indices
        correct1 += int((topk[:, 0] == labels).sum())
        correct5 += int((topk == labels[:, None]).any(dim=1).sum())
        count += labels.numel()
        confusion += torch.bincount(labels.cpu() * num_classes + topk[:, 0].cpu(),
                                    minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return {"top1": 100.0 * correct1 / count, "top5": 100.0 * correct5 / count, "loss": loss_sum / count,
            "count": count, "skipped": skipped, "confusion": confusion}


def confusion_png(confusion: torch.Tensor, classes: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Row-normalised confusion matrix as a heat map with counts (Pillow only)."""
    n = confusion.shape[0]
    cell = max(18, min(48, 720 // max(n, 1)))
    label_w = 8 + 7 * max((len(c) for c in classes), default=1) if n <= 40 else 8
    top = 28 + (label_w if n <= 40 else 8)
    size = (label_w + n * cell + 10, top + n * cell + 24)
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((4, 4), title or "confusion matrix (rows: true, cols: predicted)", fill="black")
    rows = confusion.float() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    for i in range(n):
        for j in range(n):
            v = float(rows[i, j])
            shade = int(255 * (1 - v))
            x0, y0 = label_w + j * cell, top + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            if cell >= 24 and confusion[i, j] > 0:
                draw.text((x0 + 3, y0 + cell // 2 - 6), str(int(confusion[i, j])), fill="white" if v > 0.5 else "black")
        if n <= 40:
            draw.text((4, top + i * cell + cell // 2 - 6), classes[i], fill="black")
    if n <= 40:  # column labels, written vertically
        for j, name in enumerate(classes):
            label = Image.new("RGB", (label_w, 14), "white")
            ImageDraw.Draw(label).text((2, 1), name, fill="black")
            img.paste(label.rotate(90, expand=True), (label_w + j * cell + cell // 2 - 7, 26))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


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


def run_eval(cfg: DictConfig) -> dict:
    from sparse_mae.train.distributed import resolve_device

    device = resolve_device(cfg.device)
    model, classes, which = load_classifier(cfg.ckpt, cfg.use_ema)
    dataset, data_classes = build_split(cfg.data, "val", classes)
    if classes and list(classes) != list(data_classes):  # labels beyond the head made an IndexError
        raise ValueError(f"the checkpoint's classes {list(classes)[:10]} are not the val data's "
                         f"{list(data_classes)[:10]}; evaluate on the data it was fine-tuned on")
    classes = classes or data_classes
    if len(classes) != model.num_classes:
        raise ValueError(f"the model has {model.num_classes} classes, the val data {len(classes)}; "
                         f"evaluate on the data it was fine-tuned on")
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.data.num_workers)
    result = evaluate_classifier(model.to(device), loader, len(classes), device)
    out = Path(cfg.out) if cfg.out else Path(cfg.ckpt).parent
    png = confusion_png(result["confusion"], classes, out / "confusion_matrix.png",
                        title=f"{Path(cfg.ckpt).name} ({which}): top-1 {result['top1']:.2f}%")
    summary = {k: result[k] for k in ("top1", "top5", "loss", "count", "skipped")} | {
        "weights": which, "checkpoint": str(cfg.ckpt), "classes": classes,
        "confusion": result["confusion"].tolist()}
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    return summary | {"png": png}


def _run_and_print(cfg: DictConfig) -> int:
    summary = run_eval(cfg)
    print(f"{summary['checkpoint']} ({summary['weights']} weights) on {summary['count']} val images: "
          f"top-1 {summary['top1']:.2f}%  top-5 {summary['top5']:.2f}%  loss {summary['loss']:.4f}"
          + (f"  ({summary['skipped']} unreadable files left out)" if summary["skipped"] else ""))
    print(f"confusion matrix: {summary['png']}")
    return 0


def main() -> int:
    return tool_main("eval", _run_and_print)
