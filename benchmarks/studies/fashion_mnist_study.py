"""Does FCMAE pretraining help on real images? Fashion-MNIST, one command:

    .venv/bin/python benchmarks/studies/fashion_mnist_study.py                  # ~30 min on the busy 2-core CPU
    .venv/bin/python benchmarks/studies/fashion_mnist_study.py --quick          # a minutes-long smoke run (not the study)
    .venv/bin/python benchmarks/studies/fashion_mnist_study.py --pretrained outputs/fashion-mnist-study/pretrained.pt \
        --finetune-steps 200 --fractions 0.01                              # longer fine-tuning from the same encoder
    .venv/bin/python benchmarks/studies/fashion_mnist_study.py --pretrained outputs/fashion-mnist-study/pretrained.pt \
        --finetune-steps 150 --fractions 0.1 --finetune-lr 1e-3           # another fine-tuning lr, both starts
    .venv/bin/python benchmarks/studies/fashion_mnist_study.py --variant resnet18 --no-finetune
                                                   # SparK on ResNet-18, probes only -> docs/fashion-mnist/resnet18

1. Pretrain once (FCMAE, the debug variant at 128px, decoder width 128; a ResNet variant
   pretrains with SparK, the same decoder width 128) on the 60,000
   training images with the kNN monitor on; kNN accuracy of the random init is step 0.
2. Linear probe (BatchNorm without affine + Linear on frozen features) and fine-tuning
   with 1%, 10% and 100% of the training labels (class-balanced, drawn per seed), 3 seeds,
   from the pretrained encoder and from random init with the same recipe.
3. Write docs/fashion-mnist/results.{json,md} and study.png (table and plots).

What is cut to fit a 2-core CPU shared with other work (and said in results.md): the
variant (debug, not atto); pretraining length (one pass over the first --pretrain-steps x 64 images, under
one epoch of the 60,000); the probes embed a pool of the first --pool training images, so "100%" for the
linear probe is that pool, 1% and 10% are 600 and 6,000 images of it; fine-tuning takes
the same --finetune-steps x 32 images at every fraction (so at 10% and 100% it sees each
image at most once); every accuracy is on the first --num-val test images.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparse_mae.apps.finetune import compose_config as finetune_config
from sparse_mae.apps.finetune import run_finetune
from sparse_mae.apps.pretrain import compose_config as pretrain_config
from sparse_mae.apps.pretrain import run_pretrain
from sparse_mae.bench.report import cpu_name
from sparse_mae.data.dataset import SeededDataset
from sparse_mae.data.fashion_mnist import CLASSES, FashionMnist, FashionMnistSource, labelled_fraction
from sparse_mae.data.transforms import EvalTransform
from sparse_mae import create_model
from sparse_mae.models import RESNET_VARIANTS, pretraining_model_name
from sparse_mae.probe.classify import knn_classify, linear_probe
from sparse_mae.probe.features import batches_of, embed, load_encoder
from sparse_mae.probe.monitor import KnnMonitor

REPO = Path(__file__).resolve().parents[2]
FULL_TRAIN = 60_000
FRACTIONS = (0.01, 0.1, 1.0)
VARIANT, SIZE, DECODER_DIM = "debug", 128, 128
# Both starts get the same recipes; short ones, since the budget is minutes.
PRETRAIN = {"model": VARIANT, "model.decoder_dim": DECODER_DIM, "data": "fashion_mnist", "data.size": SIZE,
            "data.num_workers": 0, "batch_size": 64, "epochs": 1, "optim.lr": 2e-3, "sched.warmup_steps": 20,
            "logger": "none", "logger.progress": "false", "recon.num_images": 4, "recon.every_steps": 0,
            "knn.enabled": "true", "knn.num_train": 1000, "knn.num_val": 500, "checkpoint.keep_last": 1}
FINETUNE = {"model": VARIANT, "finetune/data@data": "fashion_mnist", "data.size": SIZE, "data.num_workers": 0,
            "data.scale": "[0.5,1.0]", "batch_size": 32, "sched.warmup_steps": 5, "optim.lr": 3e-3,
            "optim.weight_decay": 0.05, "layer_decay": 0.8, "label_smoothing": 0.1, "ema.enabled": "false",
            "model.drop_path_rate": 0.0, "eval_every_epochs": 100_000, "logger": "none", "logger.progress": "false",
            "checkpoint.keep_last": 1}
LINEAR = {"epochs": 100, "batch_size": 256, "lr": 0.1}


def overrides(values: dict) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def knn_curve(metrics: Path) -> list[dict]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "top1": r["knn/top1"], "top5": r["knn/top5"], "seconds": r["knn/seconds"]}
            for r in rows if "knn/top1" in r]


def step_seconds(metrics: Path, batch: int) -> float:
    """Median seconds per pretraining step from the logged img_per_s: the median leaves out the
    logging windows that hold a monitor call (one in every_steps / log_every_steps) and start-up."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["img_per_s"] for r in rows if "img_per_s" in r]
    return batch / statistics.median(rates[1:] or rates)


def embed_split(encoder, head, source: FashionMnist, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = SeededDataset(FashionMnistSource(source), EvalTransform(SIZE))
    with torch.no_grad():
        return embed(encoder, head, batches_of(dataset, list(range(count)), 128), torch.device("cpu"))


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default=VARIANT, help="encoder variant (debug: what a shared 2-core CPU affords; "
                    "resnet18 etc. pretrain with SparK)")
    ap.add_argument("--root", default=None, help="Fashion-MNIST idx folder (default: Debian's)")
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--knn-every", type=int, default=50)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument("--pool", type=int, default=10_000, help="training images embedded for the probes")
    ap.add_argument("--num-val", type=int, default=2000, help="test images every accuracy is measured on")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="default: docs/fashion-mnist (--quick: outputs/fashion-mnist-quick)")
    ap.add_argument("--no-finetune", action="store_true", help="probes only (linear and kNN): the fine-tuning "
                    "half is over half the study's time")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the script, measures nothing")
    ap.add_argument("--pretrained", default=None, help="fine-tune only, from this pretraining checkpoint (the "
                    "study keeps its own as outputs/fashion-mnist-study/pretrained.pt)")
    ap.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS), help="with --pretrained")
    ap.add_argument("--finetune-lr", type=float, default=None, help="with --pretrained: this fine-tuning lr for "
                    f"both starts instead of the recipe's {FINETUNE['optim.lr']}")
    args = ap.parse_args(argv)
    if args.pretrained:
        out = Path(args.out or REPO / "docs" / "fashion-mnist")
        out.mkdir(parents=True, exist_ok=True)
        return finetune_only(args, out)
    if args.quick:
        args.pretrain_steps, args.knn_every, args.finetune_steps, args.pool, args.num_val = 6, 3, 3, 300, 200
        args.seeds = args.seeds[:2]
    root = {"data.root": args.root} if args.root else {}
    out = Path(args.out or REPO / ("outputs/fashion-mnist-quick" if args.quick else "docs/fashion-mnist"))
    out = out if args.out or args.variant == VARIANT else out / args.variant
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    timings: dict[str, float] = {}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # -- 1. pretraining, with the kNN monitor; step 0 is the encoder the run starts from
        # one epoch over the first steps x 64 images: the lr schedule ends where the run does
        cfg = pretrain_config(overrides({**PRETRAIN, **root, "model": args.variant,
                                         "data.num_images": args.pretrain_steps * 64,
                                         "sched.warmup_steps": min(PRETRAIN["sched.warmup_steps"], args.pretrain_steps),
                                         "knn.every_steps": args.knn_every, "checkpoint.every_steps":
                                         args.pretrain_steps, "output_dir": tmp / "pretrain"}))
        torch.manual_seed(cfg.seed)  # as the engine seeds before it builds the model
        start_model = create_model(pretraining_model_name(args.variant), backend="dense_masked",
                                   decoder_dim=DECODER_DIM)
        step0 = KnnMonitor(cfg.data, cfg.knn, torch.device("cpu"))(start_model.encoder)
        t = time.time()
        pre = run_pretrain(cfg)
        timings["pretrain_s"] = time.time() - t
        curve = [{"step": 0, "top1": step0["knn/top1"], "top5": step0["knn/top5"], "seconds": step0["knn/seconds"]}]
        curve += knn_curve(pre.metrics)
        monitor_s = sum(c["seconds"] for c in curve[1:])
        sec_per_step = step_seconds(pre.metrics, PRETRAIN["batch_size"])
        monitor = {"calls": len(curve) - 1, "seconds_total": monitor_s, "seconds_per_call": monitor_s / (len(curve) - 1),
                   "share_of_this_run": monitor_s / timings["pretrain_s"], "step_seconds": sec_per_step,
                   # the default cadence: knn.every_steps=1000, the same bank and queries
                   "share_at_default_cadence": (monitor_s / (len(curve) - 1))
                   / (monitor_s / (len(curve) - 1) + 1000 * sec_per_step)}
        print(f"pretraining: {pre.steps} steps, loss {pre.losses[0]:.3f} -> {pre.losses[-1]:.3f}, "
              f"{timings['pretrain_s']:.0f} s; kNN top-1 {curve[0]['top1']:.1f} -> {curve[-1]['top1']:.1f}; "
              f"monitor {monitor['seconds_per_call']:.1f} s per call ({100 * monitor['share_of_this_run']:.1f}% of "
              f"this run; {100 * monitor['share_at_default_cadence']:.2f}% at every_steps=1000)", flush=True)

        # -- 2a. linear probe on frozen features: one pretrained encoder, one random encoder per seed
        t = time.time()
        data_root = args.root or cfg.data.root
        train_src, test_src = FashionMnist(data_root, "train"), FashionMnist(data_root, "test")
        pool, num_val = min(args.pool, len(train_src)), min(args.num_val, len(test_src))
        encoders = {"pretrained": load_encoder(str(pre.checkpoint), args.variant)}
        encoders |= {f"random-{s}": load_encoder(None, args.variant, seed=s) for s in args.seeds}
        feats = {name: (embed_split(enc, head, train_src, pool), embed_split(enc, head, test_src, num_val))
                 for name, (enc, head, _) in encoders.items()}
        pool_labels = train_src.labels[:pool]
        rows = []
        for fraction in FRACTIONS:
            count = min(pool, round(FULL_TRAIN * fraction))
            for seed in args.seeds:
                keep = torch.from_numpy(labelled_fraction(pool_labels, count / pool, seed)) if count < pool \
                    else torch.arange(pool)
                for start, name in (("pretrained", "pretrained"), ("random init", f"random-{seed}")):
                    (tx, ty), (vx, vy) = feats[name]
                    lin = linear_probe(tx[keep], ty[keep], vx, vy, len(CLASSES), seed=seed, **LINEAR)
                    knn = knn_classify(tx[keep], ty[keep], vx, vy, len(CLASSES))
                    rows.append({"method": "linear probe", "fraction": fraction, "labels": len(keep), "seed": seed,
                                 "start": start, "top1": lin["top1"], "top5": lin["top5"]})
                    rows.append({"method": "kNN", "fraction": fraction, "labels": len(keep), "seed": seed,
                                 "start": start, "top1": knn["top1"], "top5": knn["top5"]})
            print(f"probes at {fraction:.0%}: " + ", ".join(
                f"{r['method']} {r['start']} s{r['seed']} {r['top1']:.1f}" for r in rows if r["fraction"] == fraction),
                flush=True)
        timings["probes_s"] = time.time() - t

        # -- 2b. fine-tuning, the same budget of steps at every fraction
        t = time.time()
        if not args.no_finetune:
            rows += finetune_rows(args, pre.checkpoint, FRACTIONS, num_val, root, tmp)
        timings["finetune_s"] = time.time() - t
        # kept (outputs/ is not committed) for --pretrained: longer fine-tuning from the same encoder
        kept = REPO / "outputs" / "fashion-mnist-study" / ("" if args.variant == VARIANT else args.variant) \
            / "pretrained.pt"
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pre.checkpoint, kept)
    timings["total_s"] = time.time() - began
    write_results(out, args, rows, curve, monitor, timings, pre)


def finetune_rows(args, checkpoint, fractions, num_val: int, root: dict, tmp: Path) -> list[dict]:
    """Fine-tune from `checkpoint` and from random init, --finetune-steps at every fraction and seed."""
    rows = []
    recipe = {**FINETUNE, **({"optim.lr": args.finetune_lr} if getattr(args, "finetune_lr", None) else {})}
    for fraction in fractions:
        labelled = round(FULL_TRAIN * fraction)
        # the lr schedule spans whole epochs: as close to the step budget as they allow
        epochs = max(1, math.ceil(args.finetune_steps / max(1, labelled // FINETUNE["batch_size"])))
        for seed in args.seeds:
            for start, ckpt in (("pretrained", checkpoint), ("random init", None)):
                run = run_finetune(finetune_config(overrides({
                    **recipe, **root, "model": args.variant, "data.label_fraction": fraction,
                    "data.label_seed": seed,
                    "data.num_val": num_val, "epochs": epochs, "max_steps": args.finetune_steps, "seed": seed,
                    "sched.warmup_steps": min(FINETUNE["sched.warmup_steps"], args.finetune_steps),
                    "checkpoint.every_steps": args.finetune_steps,
                    "pretrained": ckpt if ckpt is not None else "null",
                    "output_dir": tmp / f"ft-{fraction}-{seed}-{start.replace(' ', '-')}"})))
                final = [e for e in run.evals if e["step"] == run.steps and e["weights"] == "model"][-1]
                rows.append({"method": "fine-tune", "fraction": fraction, "labels": labelled, "seed": seed,
                             "start": start, "top1": final["top1"], "top5": final["top5"],
                             "steps": args.finetune_steps})
                print(f"fine-tune {fraction:.0%} seed {seed} {start}: top-1 {final['top1']:.1f}", flush=True)
    return rows


def finetune_only(args, out: Path) -> None:
    """--pretrained: fine-tuning alone, from a kept pretraining checkpoint, at --fractions."""
    began = time.time()
    root = {"data.root": args.root} if args.root else {}
    with tempfile.TemporaryDirectory() as tmp:
        rows = finetune_rows(args, Path(args.pretrained), args.fractions, args.num_val, root, Path(tmp))
    minutes = (time.time() - began) / 60
    lr = args.finetune_lr or FINETUNE["optim.lr"]
    name = f"finetune-{args.finetune_steps}-steps-" + "-".join(f"{f:.0%}" for f in args.fractions).replace("%", "pc")
    name += f"-lr{lr:g}" if args.finetune_lr else ""
    record = {"args": vars(args), "finetune": {**FINETUNE, "optim.lr": lr}, "rows": rows, "minutes": minutes,
              "load_average_at_end": load_average()}
    (out / f"{name}.json").write_text(json.dumps(record, indent=1))
    lines = [f"Fine-tuning for {args.finetune_steps} steps (batch 32, lr {lr:g}) from {Path(args.pretrained).name}, "
             f"{minutes:.1f} min, load average at the end {load_average()}; top-1 on the first {args.num_val} "
             f"test images:", "", "| labels | seed | pretrained | random init |", "|---|---|---|---|"]
    for fraction in args.fractions:
        for seed in args.seeds:
            pair = {r["start"]: r["top1"] for r in rows if r["fraction"] == fraction and r["seed"] == seed}
            lines.append(f"| {fraction:.0%} | {seed} | {pair['pretrained']:.1f} | {pair['random init']:.1f} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def methods(rows: list[dict]) -> list[str]:
    return [m for m in ("fine-tune", "linear probe", "kNN") if any(r["method"] == m for r in rows)]


def goals(rows: list[dict], seeds: list[int]) -> dict[str, bool]:
    """Pretrained beats random init on every seed, per method and label fraction."""
    met = {}
    for method in methods(rows):
        for fraction in FRACTIONS:
            pairs = [[r["top1"] for r in rows if r["method"] == method and r["fraction"] == fraction and
                      r["seed"] == s and r["start"] == start] for s in seeds for start in ("pretrained", "random init")]
            wins = [p[0] > r[0] for p, r in zip(pairs[0::2], pairs[1::2])]
            met[f"{method} {fraction:.0%}"] = all(wins)
    return met


def write_results(out: Path, args, rows, curve, monitor, timings, pre) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    result = {"args": vars(args), "pretrain": PRETRAIN, "finetune": FINETUNE, "linear": LINEAR, "rows": rows,
              "knn_curve": curve, "monitor": monitor, "timings": timings, "commit": commit,
              "pretrain_loss": {"first": pre.losses[0], "last": pre.losses[-1]},
              "goals": goals(rows, args.seeds), "load_average_at_end": load_average(),
              "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}"}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    recipe = (f"SparK on {args.variant}" if args.variant in RESNET_VARIANTS else f"FCMAE on ConvNeXt V2 {args.variant}")
    lines = [f"# Fashion-MNIST study, {recipe}: pretrained vs random init ({'QUICK SMOKE RUN, not the study' if args.quick else 'measured'})",
             "", f"`benchmarks/studies/fashion_mnist_study.py` at commit {commit}; {result['machine']}; "
             f"{timings['total_s'] / 60:.1f} min in all (pretraining {timings['pretrain_s'] / 60:.1f}, probes "
             f"{timings['probes_s'] / 60:.1f}, fine-tuning " + ("not run: --no-finetune" if args.no_finetune else
             f"{timings['finetune_s'] / 60:.1f}") + "); load average at the "
             f"end {result['load_average_at_end']}.", "",
             f"Top-1 on the first {args.num_val} test images, mean ± sd over seeds {args.seeds} "
             f"(per-seed values in results.json); top-5 in results.json.", "",
             "| method | labels | pretrained | random init | pretrained wins on every seed |", "|---|---|---|---|---|"]
    met = result["goals"]
    for method in methods(rows):
        for fraction in FRACTIONS:
            sel = [r for r in rows if r["method"] == method and r["fraction"] == fraction]
            pre_t = [r["top1"] for r in sel if r["start"] == "pretrained"]
            rnd_t = [r["top1"] for r in sel if r["start"] == "random init"]
            lines.append(f"| {method} | {fraction:.0%} ({sel[0]['labels']} images) | {mean_sd(pre_t)} | "
                         f"{mean_sd(rnd_t)} | {'yes' if met[f'{method} {fraction:.0%}'] else 'no'} |")
    lines += ["", "kNN monitor along pretraining (1000 bank / 500 query images, k 20, T 0.07): " + ", ".join(
        f"step {c['step']}: {c['top1']:.1f}" for c in curve), "",
        f"Monitor cost: {monitor['seconds_per_call']:.1f} s per call, {100 * monitor['share_of_this_run']:.1f}% of "
        f"this pretraining run at every {args.knn_every} steps; a step took {monitor['step_seconds']:.2f} s, so "
        f"at the default cadence (knn.every_steps=1000) it would be "
        f"{100 * monitor['share_at_default_cadence']:.2f}% of the run."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    plot(out / "study.png", rows, curve, args.seeds)
    print("\n".join(lines))


def plot(path: Path, rows, curve, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = methods(rows)
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(4.5 * (len(shown) + 1), 4))
    for ax, method in zip(axes, shown):
        for start, colour in (("pretrained", "tab:blue"), ("random init", "tab:orange")):
            for seed in seeds:
                pts = sorted((r["fraction"], r["top1"]) for r in rows
                             if r["method"] == method and r["start"] == start and r["seed"] == seed)
                ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], "o-", color=colour, alpha=0.7,
                        label=start if seed == seeds[0] else None)
        ax.set_xscale("log")
        ax.set_xlabel("training labels (%)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(method)
        ax.legend()
        ax.grid(alpha=0.3)
    axes[-1].plot([c["step"] for c in curve], [c["top1"] for c in curve], "o-")
    axes[-1].set_xlabel("pretraining step")
    axes[-1].set_ylabel("kNN top-1 (%)")
    axes[-1].set_title("kNN monitor during pretraining")
    axes[-1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
