"""`sparse-mae flops`: the paper-style table of params and GFLOPs (MACs, as the paper counts).

    sparse-mae flops                               # the eight variants at 224, FCMAE at mask 0.6
    sparse-mae flops --size 224 512 --mask-ratio 0.75 --variants atto tiny huge
    sparse-mae flops --variants resnet18 resnet50 resnet101   # SparK's ResNets

Per variant and size: classifier params (1000 classes) and GFLOPs, counted by torch's
FlopCounterMode over a forward on the meta device (no memory, even for huge) and checked
against the analytic per-patch formula; then the pretraining forward (FCMAE for ConvNeXt V2,
SparK for a ResNet): encoder dense (every patch) and sparse (visible patches only, at the
mask ratio), decoder (dense), and the total dense vs sparse.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from sparse_mae.flops import (
    classifier_gmacs, count_params, fcmae_gmacs, measured_gmacs, resnet_classifier_gmacs, spark_gmacs,
)
from sparse_mae.build import create_model
from sparse_mae.models import RESNET_VARIANTS, model_name, pretraining_model_name
from sparse_mae.models.convnextv2 import PATCH, VARIANTS
from sparse_mae.models.fcmae import check_mask_ratio

PAPER_VARIANTS = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


def flops_rows(variants=PAPER_VARIANTS, sizes=(224,), mask_ratio: float = 0.6, num_classes: int = 1000) -> list[dict]:
    """One dict per (variant, size): params in M, GMACs per image."""
    check_mask_ratio(mask_ratio)
    for v in variants:
        if v not in VARIANTS and v not in RESNET_VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid variants: {', '.join([*VARIANTS, *RESNET_VARIANTS])}")
    for s in sizes:
        if s < PATCH or s % PATCH:
            raise ValueError(f"sizes must be positive multiples of {PATCH}, got {s}")
    rows = []
    for variant in variants:
        resnet = variant in RESNET_VARIANTS
        with torch.device("meta"):
            classifier = create_model(model_name("resnet" if resnet else "convnextv2", variant),
                                      num_classes=num_classes)
            pretraining = create_model(pretraining_model_name(variant), backend="dense_masked")
        params = count_params(classifier)
        for size in sizes:
            measured = measured_gmacs(classifier, (size, size))
            analytic = (resnet_classifier_gmacs(classifier, (size, size)) if resnet
                        else classifier_gmacs(variant, (size, size), num_classes=num_classes))
            if abs(measured - analytic) > 1e-6 * analytic:  # the two counts must agree on a dense model
                raise RuntimeError(f"{variant}@{size}: FlopCounterMode {measured} != analytic {analytic} GMACs")
            g = (spark_gmacs if resnet else fcmae_gmacs)(pretraining, (size, size), mask_ratio=mask_ratio)
            rows.append({
                "variant": variant, "size": size, "params_m": params / 1e6,
                "pretraining_model": pretraining_model_name(variant),
                "pretrain_params_m": count_params(pretraining) / 1e6,
                "gflops": measured, "encoder_dense": g.encoder_dense, "encoder_sparse": g.encoder_useful,
                "decoder": g.decoder, "pretrain_dense": g.total_dense, "pretrain_sparse": g.total_useful,
                "mask_ratio": mask_ratio,
            })
    return rows


def markdown(rows: list[dict]) -> str:
    ratio = rows[0]["mask_ratio"] if rows else "?"
    lines = [
        f"GFLOPs = GMACs per image (as the paper). Classifier: 1000 classes. Pretraining at mask ratio {ratio}: "
        "FCMAE (ConvNeXt V2, decoder 1 block of dim 512) or SparK (ResNet, light UNet decoder of width 512); "
        "sparse = encoder on visible patches only.",
        "",
        "| variant | size | params (M) | GFLOPs | pretraining | params (M) | encoder dense | encoder sparse | "
        "decoder | dense | sparse | sparse / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['params_m']:.1f} | {r['gflops']:.2f} | {r['pretraining_model']} | "
            f"{r['pretrain_params_m']:.1f} | {r['encoder_dense']:.2f} | {r['encoder_sparse']:.2f} | {r['decoder']:.2f} | "
            f"{r['pretrain_dense']:.2f} | {r['pretrain_sparse']:.2f} | {r['pretrain_sparse'] / r['pretrain_dense']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparse-mae flops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(PAPER_VARIANTS),
                    help="default: the eight paper variants; ResNets (resnet18, resnet50, ...) pretrain with SparK")
    ap.add_argument("--size", nargs="+", type=int, default=[224], help="square image sizes, multiples of 32")
    ap.add_argument("--mask-ratio", type=float, default=0.6)
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON instead of a markdown table")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        rows = flops_rows(args.variants, args.size, args.mask_ratio, args.num_classes)
    except ValueError as error:
        ap.error(str(error))
    print(json.dumps(rows, indent=2) if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
