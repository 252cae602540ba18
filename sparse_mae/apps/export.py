"""`sparse-mae export ckpt=PATH format=F out=PATH`: our checkpoint -> timm / official / SparK / ONNX.

Prints what it wrote and the conversion check: the dense classifier rebuilt from the
exported tensors, run on a masked image with the mask re-applied as the dense_masked
reference does, against the source weights' sparse encoder (each available backend) at
visible sites.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig

from sparse_mae.apps.app import tool_main

from sparse_mae.convert import (
    build_from_state_dict,
    conversion_check,
    export_state_dict,
    inspect_state_dict,
    read_state_dict,
    write_state_dict,
)

CHECK_TOLERANCE = 1e-3  # relative to the output scale; fp32 reorderings stay ~1e-6


def export_onnx(model: torch.nn.Module, path: Path, image_size: int, opset: int) -> Path:
    """Dense classifier (or encoder) -> ONNX with a dynamic batch dimension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(1, model.in_chans, image_size, image_size)
    output = "logits" if model.num_classes else "features"
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation / tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (example,), str(path), input_names=["images"], output_names=[output],
                          dynamic_axes={"images": {0: "batch"}, output: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return path


def run_export(cfg: DictConfig) -> dict:
    """Run one export; returns a summary dict (path, spec, check report)."""
    fmt = str(cfg.format)
    variant = str(cfg.variant) if cfg.variant is not None else None
    source_sd, source_meta = read_state_dict(cfg.ckpt)
    source_spec = inspect_state_dict(source_sd, "sparse_mae", variant, strict=cfg.strict,
                                     source=f"checkpoint {cfg.ckpt}")
    layout = "sparse_mae" if fmt == "onnx" else fmt
    exported, spec = export_state_dict(source_sd, layout, variant, head=cfg.head,
                                       num_classes=cfg.num_classes, strict=cfg.strict)
    out = Path(cfg.out)
    metadata = {"variant": spec.variant, "kind": spec.kind, "num_classes": spec.num_classes,
                "in_chans": spec.in_chans, "format": fmt, "source": str(cfg.ckpt),
                "source_kind": source_spec.kind}
    if "step" in source_meta:
        metadata["source_step"] = source_meta["step"]
    if fmt == "onnx":
        if out.suffix != ".onnx":
            raise ValueError(f"format=onnx writes an .onnx file; got out={out}")
        export_onnx(build_from_state_dict(exported, spec), out, cfg.onnx.image_size, cfg.onnx.opset)
    else:
        if not out.suffix:
            out = out.with_suffix(".safetensors")
        write_state_dict(exported, out, metadata, wrapper="module" if fmt == "spark" else "model")
    report = {}
    if cfg.check:
        backends = list(cfg.check_backends) if cfg.check_backends else None
        report = conversion_check(source_sd, source_spec, exported, layout, spec, backends=backends)
    return {"out": out, "spec": spec, "source_spec": source_spec, "check": report, "metadata": metadata}


def _run_and_print(cfg: DictConfig) -> int:
    result = run_export(cfg)
    print(f"source: {result['source_spec'].describe()} from {cfg.ckpt}")
    print(f"wrote {result['out']}: {cfg.format} layout of {result['spec'].describe()}")
    worst = 0.0
    for backend, r in result["check"].items():
        print(f"conversion check vs {backend:<12} max |diff| at visible sites {r['max_abs']:.3e} "
              f"(relative {r['relative']:.3e})")
        worst = max(worst, r["relative"])
    if worst > CHECK_TOLERANCE:
        print(f"conversion check FAILED: relative difference {worst:.3e} > {CHECK_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    return tool_main("export", _run_and_print)
