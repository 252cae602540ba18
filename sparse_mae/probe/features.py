"""Frozen encoder features as a classifier head sees them: the encoder's last map, global
average pooled, then for ConvNeXt V2 the final LayerNorm (the head's own for a classifier
checkpoint; for an encoder-only one, a LayerNorm without affine, i.e. a fresh head's at
init). A ResNet's `fc` reads the pooled map itself: no norm.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from sparse_mae.data.loader import to_model
from sparse_mae.models.convnextv2 import LN_EPS, ConvNeXtV2, build_convnextv2
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS
from sparse_mae.models.resnet import build_resnet
from sparse_mae.train.signals import StopRequest, until_stopped


class FeatureHead(torch.nn.Module):
    """(N, C, h, w) map -> (N, C): mean over sites, then LayerNorm (affine only when given);
    `layer_norm=False` (ResNets): the mean only."""

    def __init__(self, dim: int, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 layer_norm: bool = True):
        super().__init__()
        self.dim, self.layer_norm = dim, layer_norm
        self.register_buffer("weight", None if weight is None else weight.detach().clone().float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.float().mean(dim=(2, 3))
        if not self.layer_norm:
            return pooled
        return F.layer_norm(pooled, (self.dim,), self.weight, self.bias, LN_EPS)


def load_encoder(path: str | None, variant: str, fmt: str = "auto", seed: int = 0,
                 option: str = "ckpt") -> tuple[ConvNeXtV2, FeatureHead, str]:
    """-> (encoder without head, its feature head, what was loaded). From any checkpoint that
    `sparse-mae import` reads (ours: pretrain, finetune, export; timm; official); without
    `path`, a random-init encoder of `variant` drawn from `seed` (global RNG untouched)."""
    from sparse_mae.convert import encoder_part
    from sparse_mae.convert.starting_weights import read_weights

    resnet = variant in RESNET_VARIANTS
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = (build_resnet if resnet else build_convnextv2)(variant, num_classes=0)
    dim = encoder.num_features
    if path is None:
        name = variant if resnet else f"convnextv2_{variant}"
        return (encoder.eval(), FeatureHead(dim, layer_norm=not resnet),
                f"a random-init {name} encoder (seed {seed})")
    sd, spec, fmt = read_weights(path, fmt, variant, option)
    weights, _ = encoder_part(sd, spec)
    norm_weight, norm_bias = weights.get("head.norm.weight"), weights.get("head.norm.bias")
    encoder.load_state_dict({k: v for k, v in weights.items() if not k.startswith(("head.", "fc."))}, strict=True)
    if resnet:
        return encoder.eval(), FeatureHead(dim, layer_norm=False), f"the encoder of the {fmt} {spec.kind} " \
            f"checkpoint {path} (average pooled, as its fc reads it)"
    head = FeatureHead(dim, norm_weight, norm_bias)
    norm = "the classifier head's LayerNorm" if norm_weight is not None else "a LayerNorm without affine"
    return encoder.eval(), head, f"the encoder of the {fmt} {spec.kind} checkpoint {path} ({norm})"


@torch.no_grad()
def embed(encoder: torch.nn.Module, head: FeatureHead, batches: Iterable[dict], device: torch.device,
          amp: bool = False, stop: StopRequest | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (features (N, C) float32 on CPU, labels (N,) long). Items standing in for a
    damaged sample ("skipped") are left out. The caller sets eval mode. A stop signal
    (`stop`) abandons it at the next batch (PhaseAbandoned)."""
    feats, labels = [], []
    dataset = getattr(batches, "dataset", None)  # a DataLoader's: data.decode=gpu falls back through it
    for batch in until_stopped(batches, stop, "embedding"):
        batch = to_model(batch, device, dataset)
        keep = batch["skipped"] == 0
        if not keep.any():
            continue
        keep = keep.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            x = encoder.forward_features(batch["image"][keep])
        feats.append(head.to(device)(x).cpu())
        labels.append(batch["label"][keep].long().cpu())
    if not feats:
        raise ValueError("no images to embed (the split is empty, or every file in it is unreadable)")
    return torch.cat(feats), torch.cat(labels)


def batches_of(dataset, indices: list[int], batch_size: int):
    """The items `indices` of `dataset`, in lists of `batch_size` read in this process (no
    DataLoader workers: the kNN monitor reads a few hundred images between training steps)."""
    for start in range(0, len(indices), batch_size):
        yield [dataset[i] for i in indices[start:start + batch_size]]


def evenly_spaced(length: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(length) (all of them if count >= length):
    a fixed subset that covers class-sorted folders as well as shuffled files, with no RNG."""
    if count >= length:
        return list(range(length))
    return [int(i * length // count) for i in range(count)]
