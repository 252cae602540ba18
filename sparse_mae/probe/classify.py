"""Classifiers on frozen features: weighted kNN and the linear probe.

kNN as in the self-supervised literature (InstDisc, DINO, solo-learn): features and
memory bank L2-normalised, the k most cosine-similar bank entries vote for their class
with weight exp(cosine / temperature); classes are ranked by their summed votes.

Linear probe as MAE's main_linprobe.py: BatchNorm1d without affine (eps 1e-6) before the
Linear layer, so the features' scale does not matter; SGD with momentum 0.9, a half-cosine
lr and no weight decay by default. It trains on fixed features (one embedding, no
augmentation), which is what makes it cheap enough to repeat per seed and label fraction.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparse_mae.train.evaluation import topk_hits
from sparse_mae.train.schedule import linear_scaled_lr
from sparse_mae.train.signals import StopRequest, until_stopped


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """scores (N, classes), labels (N,) -> {"top1", "top5"} in percent (top-5 = top-k for fewer classes)."""
    _, hits1, hits5 = topk_hits(scores, labels)
    return {"top1": 100.0 * hits1 / len(labels), "top5": 100.0 * hits5 / len(labels)}


def check_features(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   num_classes: int) -> None:
    if train_x.dim() != 2 or test_x.dim() != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"features must be (N, C) with one C, got {tuple(train_x.shape)} and {tuple(test_x.shape)}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"{len(train_x)} / {len(test_x)} features but {len(train_y)} / {len(test_y)} labels")
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("the train and test features must not be empty")
    for name, y in (("train", train_y), ("test", test_y)):
        if int(y.min()) < 0 or int(y.max()) >= num_classes:
            raise ValueError(f"{name} labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    if not (torch.isfinite(train_x).all() and torch.isfinite(test_x).all()):
        raise ValueError("the features are not finite (the encoder's weights are?)")


@torch.no_grad()
def knn_classify(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Weighted kNN top-1 / top-5 (percent) of test against the train memory bank."""
    check_features(train_x, train_y, test_x, test_y, num_classes)
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be > 0, got {k} and {temperature}")
    bank = F.normalize(train_x.float(), dim=1)
    k = min(k, len(bank))
    scores = []
    for start in range(0, len(test_x), chunk):
        sim = F.normalize(test_x[start:start + chunk].float(), dim=1) @ bank.T
        top_sim, top_idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, train_y[top_idx], (top_sim / temperature).exp())
        scores.append(votes)
    return topk_accuracy(torch.cat(scores), test_y)


class LinearProbe(torch.nn.Module):
    """BatchNorm1d(affine=False, eps=1e-6) -> Linear, as MAE's linear probe head."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = torch.nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = torch.nn.Linear(dim, num_classes)
        torch.nn.init.trunc_normal_(self.fc.weight, std=0.01)  # MAE's linprobe init
        torch.nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, batch_size: int = 256, lr: float = 0.1,
                 weight_decay: float = 0.0, seed: int = 0, stop: StopRequest | None = None) -> dict[str, float]:
    """Train the probe on (train_x, train_y); -> top-1 / top-5 (percent) on test and the final
    training loss. Init and shuffling come from `seed` (the global RNG is not touched). A
    stop signal (`stop`) abandons it at the next epoch (PhaseAbandoned)."""
    check_features(train_x, train_y, test_x, test_y, num_classes)
    if epochs <= 0 or batch_size <= 0 or lr <= 0 or weight_decay < 0:
        raise ValueError(f"epochs, batch_size and lr must be > 0 and weight_decay >= 0, got {epochs}, "
                         f"{batch_size}, {lr}, {weight_decay}")
    if len(train_x) < 2:
        raise ValueError("the linear probe needs at least 2 training images (its BatchNorm normalises over a batch)")
    train_x, test_x = train_x.float(), test_x.float()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(train_x.shape[1], num_classes)
    g = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(train_x))
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    peak = linear_scaled_lr(lr, batch_size)
    opt = torch.optim.SGD(probe.parameters(), lr=peak, momentum=0.9, weight_decay=weight_decay)
    probe.train()
    step, loss = 0, torch.tensor(math.nan)
    for _ in until_stopped(range(epochs), stop, "the linear probe"):
        order = torch.randperm(len(train_x), generator=g)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples: a lone last one waits for the next epoch
                continue
            for group in opt.param_groups:
                group["lr"] = peak * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(probe(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    probe.eval()
    with torch.no_grad():
        result = topk_accuracy(probe(test_x), test_y)
    return result | {"train_loss": float(loss.detach())}
