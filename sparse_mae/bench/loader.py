"""`sparse-mae bench bench=loader`: what feeds the step.

1. Decode + augment per core: the folder path (PIL decode of the file, RandomResizedCrop,
   flip, normalise: an image-folder source + TrainTransform) against the shard path (reduced
   DCT decode of the prepared JPEG, crop before resize, uint8: a ShardSource +
   FastTrainTransform), each through the one SeededDataset, one thread in this process, on generated photo-like JPEGs of each
   size; images per CPU-second of this process (= per core).
2. End to end: `sparse-mae pretrain data=shards` (one loader worker) images/s, beside the
   bench step's images/s at the same model, batch, size and dtype, in the same run.

The machine's load average is recorded with the numbers (a shared machine's numbers are rough).
Written: loader.json, loader.md and loader.png (images/s/core, folder vs shards, per JPEG size);
`python -m sparse_mae.bench.loader <loader.json>` draws the plot again from recorded numbers.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from sparse_mae.bench.report import cpu_name, pyplot
from sparse_mae.bench.timing import time_calls


def per_core_rate(dataset, count: int, repeats: int) -> float:
    """Images per CPU-second of this process over `count` items (best of `repeats`); each
    repeat reads other sample seeds, so no augmentation is repeated."""
    def read_all(repeat: int) -> None:
        for i in range(count):
            dataset[(i % len(dataset), repeat * count + i)]

    seconds = time_calls(read_all, warmup=0, repeats=repeats, clock=time.process_time)
    return count / max(min(seconds), 1e-9)


def measure_decode(root: Path, sizes: list[tuple[int, int]], count: int, crop: int, repeats: int, log) -> list[dict]:
    from sparse_mae.bench.images import write_jpegs
    from sparse_mae.data.decode import FastTrainTransform
    from sparse_mae.data.dataset import SeededDataset
    from sparse_mae.data.imagefolder import image_folder
    from sparse_mae.data.prepare import PrepareOptions, prepare
    from sparse_mae.data.shards import ShardSource
    from sparse_mae.data.transforms import TrainTransform

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for width, height in sizes:
            folder = root / f"jpeg_{width}x{height}"
            shards = root / f"shards_{width}x{height}"
            if not (folder / "done").exists():
                log(f"writing {count} JPEGs of {width}x{height} under {folder}")
                write_jpegs(folder, count, width, height)
                (folder / "done").write_text("")
            if not (shards / "manifest.json").exists():
                prepare(folder, shards, PrepareOptions(shard_size=max(1, count // 4)), workers=1)
            folder_rate = per_core_rate(SeededDataset(image_folder(folder), TrainTransform(crop)), count, repeats)
            shard_rate = per_core_rate(SeededDataset(ShardSource(shards), FastTrainTransform(crop)), count, repeats)
            rows.append({"jpeg": f"{width}x{height}", "crop": crop, "folder_img_s_core": folder_rate,
                         "shards_img_s_core": shard_rate, "speedup": shard_rate / folder_rate})
            log(f"{width}x{height}: folder {folder_rate:.1f} img/s/core, shards {shard_rate:.1f} img/s/core "
                f"({shard_rate / folder_rate:.1f}x)")
    finally:
        torch.set_num_threads(threads)
    return rows


def measure_end_to_end(root: Path, settings: dict, log) -> dict:
    """The bench step (isolated worker) and a short pretrain from the shards of settings["shards"]."""
    from sparse_mae.bench.runner import run_isolated, slow_dtype_reason

    variant, batch, size, dtype = settings["variant"], settings["batch_size"], settings["image_size"], settings["dtype"]
    ratio = settings["mask_ratio"]
    row = {"variant": variant, "backend": settings["backend"], "dtype": dtype, "batch": batch, "size": size,
           "mask_ratio": ratio, "threads": settings["threads"]}
    slow = slow_dtype_reason(dtype, "cpu")
    if slow:
        log(f"end to end: not measured in {dtype}: {slow}")
        return {**row, "bench_step_img_s": None, "pretrain_shards_img_s": None, "ratio": None,
                "error": f"not measured: {slow}"}
    spec = {"backend": settings["backend"], "variant": variant, "image_size": size, "mask_ratio": ratio,
            "batch_size": batch, "dtype": dtype, "device": "cpu", "warmup": 2, "repeats": settings["repeats"],
            "threads": settings["threads"], "seed": 0, "memory_guard_gib": None,
            "fresh_process": True}
    step = run_isolated(spec, timeout_s=1800, gomp_spincount=2000)
    step_rate = step.get("step_images_s") if step.get("status", "ok") == "ok" else None
    run_dir = root / f"pretrain_{time.strftime('%H%M%S')}"
    steps = settings["steps"]
    args = ["data=shards", f"data.root={root / settings['shards']}", f"model={variant}",
            f"backend={settings['backend']}", f"amp={'true' if dtype == 'bfloat16' else 'false'}",
            f"batch_size={batch}", f"data.size={size}", f"mask_ratio={ratio}", "data.num_workers=1", f"max_steps={steps}", "epochs=1000",
            "sched.warmup_steps=1", "logger=none", "logger.progress=false", "log_every_steps=2",
            f"checkpoint.every_steps={steps}", "recon.every_steps=0", "recon.num_images=1", f"output_dir={run_dir}"]
    env = {**os.environ, "GOMP_SPINCOUNT": "2000"}
    if settings["threads"]:  # the pretrain's torch threads as the bench step's
        env["OMP_NUM_THREADS"] = str(settings["threads"])
    proc = subprocess.run([sys.executable, "-m", "sparse_mae.cli", "pretrain", *args], capture_output=True,
                          text=True, env=env)
    rates = []
    if proc.returncode == 0:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["img_per_s"] for r in records[1:]]  # the first window holds start-up
    e2e = sum(rates) / len(rates) if rates else None
    row = {**row, "bench_step_img_s": step_rate, "pretrain_shards_img_s": e2e,
           "ratio": (e2e / step_rate) if e2e and step_rate else None,
           "error": None if proc.returncode == 0 else proc.stderr[-500:]}
    log(f"end to end: pretrain from shards {e2e} img/s, bench step {step_rate} img/s "
        f"({settings['threads'] or 'default'} torch threads)")
    return row


def run_loader_bench(cfg, out_dir: str | Path, log=print) -> tuple[list[dict], dict[str, Path]]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loader = cfg.loader
    root = Path(loader.work_dir).expanduser() if loader.work_dir else out / "data"
    load_before = os.getloadavg()
    decode = measure_decode(root, [tuple(s) for s in loader.jpeg_sizes], loader.images, cfg.image_size,
                            cfg.repeats, log)
    e2e = None
    if loader.end_to_end:
        backend = "native" if isinstance(cfg.backends, str) else list(cfg.backends)[0]
        e2e = measure_end_to_end(root, {"variant": str(cfg.variants[0]), "backend": str(backend),
                                        "batch_size": cfg.batch_sizes[0], "image_size": cfg.image_size,
                                        "dtype": str(cfg.dtypes[0]), "mask_ratio": float(cfg.mask_ratios[0]),
                                        "repeats": cfg.repeats,
                                        "steps": loader.pretrain_steps, "threads": cfg.threads,
                                        "shards": "shards_{}x{}".format(*loader.jpeg_sizes[-1])}, log)
    load_after = os.getloadavg()
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "load_before": load_before, "load_after": load_after}
    md = [f"CPU: {machine['cpu']} ({machine['cores']} cores); load average (1/5/15 min) "
          f"{'/'.join(f'{v:.2f}' for v in load_before)} before, {'/'.join(f'{v:.2f}' for v in load_after)} after",
          "", "| JPEG | crop | folder img/s/core | shards img/s/core | speed-up |", "|---|---|---|---|---|"]
    md += [f"| {r['jpeg']} | {r['crop']} | {r['folder_img_s_core']:.1f} | {r['shards_img_s_core']:.1f} | "
           f"{r['speedup']:.1f}x |" for r in decode]
    if e2e:
        fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else "n/a"  # noqa: E731
        ratio = f"{100 * e2e['ratio']:.0f}%" if e2e["ratio"] else "n/a"
        md += ["", "| model | backend | dtype | batch | px | bench step img/s | pretrain from shards img/s | ratio |",
               "|---|---|---|---|---|---|---|---|",
               f"| {e2e['variant']} | {e2e['backend']} | {e2e['dtype']} | {e2e['batch']} | {e2e['size']} | "
               f"{fmt(e2e['bench_step_img_s'])} | {fmt(e2e['pretrain_shards_img_s'])} | "
               f"{ratio} |"]
        if e2e["error"]:
            md += ["", e2e["error"] if e2e["error"].startswith("not measured") else f"pretrain failed: {e2e['error']}"]
    paths = {"json": out / "loader.json", "md": out / "loader.md"}
    paths["json"].write_text(json.dumps({"machine": machine, "decode": decode, "end_to_end": e2e}, indent=1))
    paths["md"].write_text("\n".join(md) + "\n")
    paths["png"] = write_loader_plot(decode, machine, out / "loader.png")
    return decode, paths


def write_loader_plot(decode: list[dict], machine: dict, path: Path) -> Path:
    """Bars of images/s/core, folder path beside shard path, one group per JPEG size, each
    group labelled with the speed-up; the CPU and load average in the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.4 + 2.2 * len(decode), 4.4))
    x = list(range(len(decode)))
    width = 0.38
    for offset, key, label, color in ((-width / 2, "folder_img_s_core", "image folder (PIL, TrainTransform)", "C0"),
                                      (width / 2, "shards_img_s_core", "shards (reduced decode, uint8)", "C1")):
        values = [r[key] for r in decode]
        bars = ax.bar([i + offset for i in x], values, width, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
    top = max([r["shards_img_s_core"] for r in decode] + [r["folder_img_s_core"] for r in decode] + [1.0])
    for i, r in enumerate(decode):
        ax.annotate(f"shards {r['speedup']:.1f}x", (i, top * 1.12), ha="center", fontweight="bold")
    ax.set_ylim(0, top * 1.25)
    ax.set_xticks(x, [f"{r['jpeg']} JPEG\n-> {r['crop']}px crop" for r in decode])
    load = machine.get("load_before")
    ax.set(ylabel="images / s / core (decode + augment)",
           title=f"loader per core: {machine.get('cpu', '?')} ({machine.get('cores', '?')} cores)"
                 + (f", load average {load[0]:.1f}" if load else ""))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_recorded(results: str | Path) -> Path:
    """loader.png beside a recorded loader.json, from its numbers (nothing is measured)."""
    results = Path(results)
    recorded = json.loads(results.read_text())
    return write_loader_plot(recorded["decode"], recorded["machine"], results.with_suffix(".png"))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sparse_mae.bench.loader <loader.json written by `sparse-mae bench bench=loader`>")
    print(plot_recorded(sys.argv[1]))
