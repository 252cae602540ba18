"""Does FCMAE pretraining help? Fine-tune the same classifier from a short pretraining and
from random init, same recipe and seed, on the built-in labelled data; print both top-1s.

    .venv/bin/python benchmarks/studies/finetune_from_pretraining.py                     # ~2.5 min on 2 cores
    .venv/bin/python benchmarks/studies/finetune_from_pretraining.py --seeds 0 1 2 3     # ~4.5 min

Measured on the 2-core CPU machine (debug model, 128px, 400 pretraining steps, 300
fine-tuning steps, seeds 0-3): pretrained 53.2% top-1 (52.3, 53.1, 59.8, 47.7), random
init 39.9% (42.2, 44.1, 34.8, 38.7); chance 12.5%. At 64px (2x2 patches, so one visible
patch per image at mask 0.6) pretraining barely helps: 36.1% vs 33.7%.

The built-in data are procedurally drawn images (8 classes, chance = 12.5%), so this is a
smoke-scale check of the whole pipeline (pretrain -> checkpoint -> dense fine-tune), not
an ImageNet result. Pretraining uses the native backend when available.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from sparse_mae.apps.finetune import compose_config as finetune_config
from sparse_mae.apps.finetune import run_finetune
from sparse_mae.apps.pretrain import compose_config as pretrain_config
from sparse_mae.apps.pretrain import run_pretrain

# A recipe that learns within a few hundred steps on the built-in data (the paper's needs
# hundreds of ImageNet epochs); the same for both starts.
FINETUNE = {"data.num_train": 128, "data.num_val": 256,
            "data.num_workers": 0, "data.scale": "[0.5,1.0]", "batch_size": 32, "epochs": 100,
            "sched.warmup_steps": 10, "optim.lr": 3e-3, "optim.weight_decay": 0.05, "layer_decay": 0.8,
            "label_smoothing": 0.1, "ema.decay": 0.98, "eval_every_epochs": 25, "model.drop_path_rate": 0.0,
            "logger": "none", "logger.progress": "false"}


def overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="debug")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--size", type=int, default=128, help="image side, a multiple of 32 (128: 4x4 patches)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        pre = run_pretrain(pretrain_config(overrides({
            "model": args.model, "data.size": args.size, "data.draw_size": args.size, "data.num_images": 1024,
            "data.num_workers": 0, "batch_size": 32, "max_steps": args.pretrain_steps, "epochs": 100,
            "sched.warmup_steps": 10, "optim.lr": 1.5e-3, "logger": "none", "logger.progress": "false",
            "recon.num_images": 0, "output_dir": out / "pretrain"})))
        print(f"pretraining ({args.model}, {pre.steps} steps): loss {pre.losses[0]:.3f} -> {pre.losses[-1]:.3f}")
        results: dict[str, list[float]] = {"pretrained": [], "random init": []}
        for seed in args.seeds:
            for start, ckpt in (("pretrained", pre.checkpoint), ("random init", None)):
                cfg = finetune_config(overrides({
                    **FINETUNE, "data.size": args.size, "data.draw_size": args.size, "model": args.model, "max_steps": args.finetune_steps, "seed": seed,
                    "pretrained": ckpt if ckpt is not None else "null",
                    "output_dir": out / f"ft-{start.replace(' ', '-')}-{seed}"}))
                result = run_finetune(cfg)
                results[start].append(result.best_top1)
                print(f"  seed {seed} {start:11s}: best top-1 {result.best_top1:.1f}%", flush=True)
    for start, top1 in results.items():
        print(f"{start:11s}: top-1 {statistics.mean(top1):.1f}% (seeds {args.seeds}: "
              f"{', '.join(f'{t:.1f}' for t in top1)}); chance 12.5%")


if __name__ == "__main__":
    main()
