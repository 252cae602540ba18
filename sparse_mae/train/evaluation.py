"""Classifier evaluation: top-1 / top-5, loss and a confusion matrix over a loader, and the
confusion matrix as a PNG. Used by fine-tuning (every evaluation) and `sparse-mae eval`."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sparse_mae.data.loader import to_model
from sparse_mae.train.signals import StopRequest, until_stopped


def topk_hits(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """scores (N, classes), labels (N,) -> (predicted class (N,), how many are right at top-1,
    how many at top-5; top-5 is top-k for fewer than 5 classes)."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return top[:, 0], int((top[:, 0] == labels).sum()), int((top == labels[:, None]).any(dim=1).sum())


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, num_classes: int, device: torch.device,
                        amp: bool = False, stop: StopRequest | None = None) -> dict:
    """-> {"top1", "top5", "loss", "count", "skipped", "confusion" (num_classes x num_classes, rows =
    truth)}. Items that stand in for a damaged sample ("skipped") are left out, so every
    readable image counts once and a damaged one not at all ("skipped": how many). A stop signal
    (`stop`) abandons it at the next batch (PhaseAbandoned)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    correct1 = correct5 = skipped = 0
    loss_sum, count = 0.0, 0
    for batch in until_stopped(loader, stop, "evaluation"):
        batch = to_model(batch, device, getattr(loader, "dataset", None))
        keep = batch["skipped"] == 0
        skipped += int((~keep).sum())
        if not keep.any():
            continue
        keep = keep.to(device)
        imgs, labels = batch["image"][keep], batch["label"][keep]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(imgs)
        logits = logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        predicted, hits1, hits5 = topk_hits(logits, labels)
        correct1 += hits1
        correct5 += hits5
        count += labels.numel()
        confusion += torch.bincount(labels.cpu() * num_classes + predicted.cpu(),
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
