"""`sparse-mae import ckpt=PATH format=F out=PATH`: timm / official checkpoint -> ours.

The output is our checkpoint format ({'model': state dict, 'config': YAML, 'metadata'}),
which `export`, `finetune` (pretrained=...) and `eval` read; export then import gives back
identical tensors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.apps.export import app_help, compose_app_config
from sparse_mae.convert import import_state_dict, read_state_dict


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
    sd, spec = import_state_dict(foreign, cfg.format, cfg.variant, strict=cfg.strict)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt = our_checkpoint(sd, spec, str(cfg.ckpt), cfg.format)
    if out.suffix == ".safetensors":
        from sparse_mae.convert import write_state_dict

        write_state_dict(sd, out, ckpt["metadata"])
    else:
        tmp = out.with_name(f".tmp-{out.name}")
        torch.save(ckpt, tmp)
        tmp.replace(out)
    return out, spec


def main() -> int:
    argv = sys.argv[1:]
    if any(a in ("-h", "--help") for a in argv):
        print(app_help("import"))
        return 0
    try:
        cfg = compose_app_config("import", argv)
        return _run_and_print(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad input: the message names the fix
        print(f"sparse-mae import: error: {e}", file=sys.stderr)
        return 2


def _run_and_print(cfg: DictConfig) -> int:
    out, spec = run_import(cfg)
    print(f"wrote {out}: our {spec.describe()} from {cfg.format} checkpoint {cfg.ckpt}")
    return 0
