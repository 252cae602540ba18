"""`sparse-mae flops`: the paper-style table of params and GFLOPs (MACs, as the paper counts).

    sparse-mae flops                               # the eight variants at 224, FCMAE at mask 0.6
    sparse-mae flops --size 224 512 --mask-ratio 0.75 --variants atto tiny huge

Per variant and size: classifier params (1000 classes) and GFLOPs, counted by torch's
FlopCounterMode over a forward on the meta device (no memory, even for huge) and checked
against the analytic per-patch formula; then the FCMAE pretraining forward: encoder dense
(every patch) and sparse (visible patches only, at the mask ratio), decoder (dense), and the
total dense vs sparse.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from sparse_mae.flops import classifier_gmacs, count_params, fcmae_gmacs, measured_gmacs
from sparse_mae.build import create_model
from sparse_mae.models.convnextv2 import PATCH, VARIANTS
from sparse_mae.models.fcmae import check_mask_ratio

PAPER_VARIANTS = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")


def flops_rows(variants=PAPER_VARIANTS, sizes=(224,), mask_ratio: float = 0.6, num_classes: int = 1000) -> list[dict]:
    """One dict per (variant, size): params in M, GMACs per image."""
    check_mask_ratio(mask_ratio)
    for v in variants:
        if v not in VARIANTS:
            raise ValueError(f"unknown variant {v!r}; valid variants: {', '.join(VARIANTS)}")
    for s in sizes:
        if s < PATCH or s % PATCH:
            raise ValueError(f"sizes must be positive multiples of {PATCH}, got {s}")
    rows = []
    for variant in variants:
        with torch.device("meta"):
            classifier = create_model(f"convnextv2_{variant}", num_classes=num_classes)
            fcmae = create_model(f"fcmae_convnextv2_{variant}", backend="dense_masked")
        params = count_params(classifier)
        for size in sizes:
            measured = measured_gmacs(classifier, (size, size))
            analytic = classifier_gmacs(variant, (size, size), num_classes=num_classes)
            if abs(measured - analytic) > 1e-6 * analytic:  # the two counts must agree on a dense model
                raise RuntimeError(f"{variant}@{size}: FlopCounterMode {measured} != analytic {analytic} GMACs")
            g = fcmae_gmacs(fcmae, (size, size), mask_ratio=mask_ratio)
            rows.append({
                "variant": variant, "size": size, "params_m": params / 1e6, "fcmae_params_m": count_params(fcmae) / 1e6,
                "gflops": measured, "encoder_dense": g.encoder_dense, "encoder_sparse": g.encoder_useful,
                "decoder": g.decoder, "fcmae_dense": g.total_dense, "fcmae_sparse": g.total_useful,
                "mask_ratio": mask_ratio,
            })
    return rows


def markdown(rows: list[dict]) -> str:
    ratio = rows[0]["mask_ratio"] if rows else "?"
    lines = [
        f"GFLOPs = GMACs per image (as the paper). Classifier: 1000 classes. FCMAE: mask ratio {ratio}, "
        "decoder 1 block of dim 512; sparse = encoder on visible patches only.",
        "",
        "| variant | size | params (M) | GFLOPs | FCMAE params (M) | encoder dense | encoder sparse | "
        "decoder | FCMAE dense | FCMAE sparse | sparse / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['params_m']:.1f} | {r['gflops']:.2f} | {r['fcmae_params_m']:.1f} | "
            f"{r['encoder_dense']:.2f} | {r['encoder_sparse']:.2f} | {r['decoder']:.2f} | {r['fcmae_dense']:.2f} | "
            f"{r['fcmae_sparse']:.2f} | {r['fcmae_sparse'] / r['fcmae_dense']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparse-mae flops", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(PAPER_VARIANTS), help="default: the eight paper variants")
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
