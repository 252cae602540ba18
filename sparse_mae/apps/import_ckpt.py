"""`sparse-mae import ckpt=PATH format=F out=PATH`: timm / official checkpoint -> ours.

The output is our checkpoint format ({'model': state dict, 'config': YAML, 'metadata'}),
which `export`, `finetune` (pretrained=...) and `eval` read; export then import gives back
identical tensors.
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.apps.app import tool_main
from sparse_mae.convert import import_state_dict, read_state_dict
from sparse_mae.io import atomic_write_bytes


def our_checkpoint(sd: dict, spec, source: str, source_format: str) -> dict:
    """The dict our apps save and load: model weights + a config naming the model + metadata."""
    config = f"model:\n  variant: {spec.variant}\n"
    if spec.kind == "classifier":
        config += f"num_classes: {spec.num_classes}\n"
    else:
        config += f"  decoder_dim: {spec.decoder_dim}\n  decoder_depth: {spec.decoder_depth}\n"
    metadata = {"variant": spec.variant, "kind": spec.kind, "num_classes": spec.num_classes,
                "in_chans": spec.in_chans, "source": source, "source_format": source_format}
    return {"model": sd, "config": config, "metadata": metadata, "step": 0}


def run_import(cfg: DictConfig) -> tuple[Path, object]:
    foreign, _ = read_state_dict(cfg.ckpt)
    variant = str(cfg.variant) if cfg.variant is not None else None
    sd, spec = import_state_dict(foreign, str(cfg.format), variant, strict=cfg.strict)
    out = Path(cfg.out)
    ckpt = our_checkpoint(sd, spec, str(cfg.ckpt), str(cfg.format))
    if out.suffix == ".safetensors":
        from sparse_mae.convert import write_state_dict

        write_state_dict(sd, out, ckpt["metadata"])
    else:
        atomic_write_bytes(out, lambda f: torch.save(ckpt, f))
    return out, spec


def _run_and_print(cfg: DictConfig) -> int:
    out, spec = run_import(cfg)
    print(f"wrote {out}: our {spec.describe()} from {cfg.format} checkpoint {cfg.ckpt}")
    return 0


def main() -> int:
    return tool_main("import", _run_and_print)
