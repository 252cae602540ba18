"""Load an exported state dict into real timm, strictly, and compare its outputs to ours.

Run by the side venv that tools/timm_env.sh builds (timm beside the torch it needs):

    .venv-timm/bin/python -I tools/timm_check.py --weights export.safetensors --model resnet50 \
        --num-classes 0 --inputs inputs.pt --expected expected.pt

It imports torch and timm only, never sparse_mae: the point is a loader that shares no code
with the exporter. The file is read by timm's own reader (safetensors, or a torch file with
the dict under 'state_dict' / 'model'), as a timm user would read it.

--inputs: a torch file {"images": (N, C, H, W)}. --expected: a torch file holding any of
  features    forward_features(images)
  pre_logits  forward_head(features, pre_logits=True)  (pooled; ConvNeXt: also its head norm)
  logits      forward_head(features)                   (needs --num-classes > 0)
each compared as max |timm - expected| / max |expected| <= --tolerance.

Prints one line of JSON. Exit status: 0 all match; 1 keys missing / unexpected / of the wrong
shape, or an output differs; 2 bad arguments or unreadable files.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

import timm
from timm.models import load_state_dict

OUTPUTS = ("features", "pre_logits", "logits")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", required=True, help="the exported file (.safetensors or a torch file)")
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet50, convnextv2_atto")
    p.add_argument("--num-classes", type=int, required=True, help="0: no classifier head")
    p.add_argument("--inputs", required=True, help='torch file {"images": tensor}')
    p.add_argument("--expected", required=True, help=f"torch file with any of {', '.join(OUTPUTS)}")
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest relative error allowed")
    return p.parse_args(argv)


def key_problems(model: torch.nn.Module, sd: dict) -> dict[str, list[str]]:
    """What a strict load would refuse, listed in full (load_state_dict stops at the first kind)."""
    want = model.state_dict()
    return {
        "missing": [k for k in want if k not in sd],
        "unexpected": [k for k in sd if k not in want],
        "wrong_shape": [f"{k}: file {tuple(sd[k].shape)}, timm {tuple(want[k].shape)}"
                        for k in want if k in sd and sd[k].shape != want[k].shape],
    }


@torch.no_grad()
def timm_outputs(model: torch.nn.Module, images: torch.Tensor, names) -> dict[str, torch.Tensor]:
    features = model.forward_features(images)
    out = {"features": features}
    if "pre_logits" in names:
        out["pre_logits"] = model.forward_head(features, pre_logits=True)
    if "logits" in names:
        out["logits"] = model.forward_head(features)
    return out


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max()) / max(float(want.double().abs().max()), 1e-30)


def check(args: argparse.Namespace) -> dict:
    result = {"model": args.model, "num_classes": args.num_classes, "weights": args.weights,
              "timm": timm.__version__, "torch": torch.__version__, "tolerance": args.tolerance}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    sd = load_state_dict(args.weights)  # timm's reader
    problems = {k: v for k, v in key_problems(model, sd).items() if v}
    if problems:
        return {**result, "ok": False, "strict_load": "refused", **problems}
    model.load_state_dict(sd, strict=True)
    model.eval()
    result["strict_load"] = "ok"

    images = torch.load(args.inputs, map_location="cpu", weights_only=True)["images"]
    expected = torch.load(args.expected, map_location="cpu", weights_only=True)
    names = [n for n in OUTPUTS if n in expected]
    unknown = sorted(set(expected) - set(OUTPUTS))
    if unknown or not names:
        raise ValueError(f"{args.expected} holds {sorted(expected)}; expected any of {', '.join(OUTPUTS)}")
    if "logits" in names and args.num_classes == 0:
        raise ValueError("logits need a classifier head: pass --num-classes N (the export's head size)")
    got = timm_outputs(model, images, names)
    errors, shapes = {}, {}
    for name in names:
        if got[name].shape != expected[name].shape:
            shapes[name] = f"timm {tuple(got[name].shape)}, expected {tuple(expected[name].shape)}"
        else:
            errors[name] = relative_error(got[name], expected[name])
    result["relative_error"] = errors
    if shapes:
        result["wrong_output_shape"] = shapes
    result["ok"] = not shapes and all(e <= args.tolerance for e in errors.values())
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = check(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        return 2
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
