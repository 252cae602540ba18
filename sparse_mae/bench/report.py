"""Write a benchmark's rows: results.csv, results.json (with the machine and its measured
matmul peaks), results.md and two PNG plots (throughput vs mask ratio per backend;
speed-up over dense_masked beside the FLOP bound, dense over useful FLOPs)."""
from __future__ import annotations

import csv
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from sparse_mae.config import COMPILED

COLUMNS = (
    "backend", "variant", "image_size", "mask_ratio", "batch_size", "dtype", "device", "status", "reason",
    "fwd_ms", "fwd_ms_iqr", "step_ms", "step_ms_iqr", "fwd_images_s", "step_images_s",
    "fwd_peak_mib", "step_peak_mib", "dense_gmacs", "useful_gmacs", "executed_gmacs",
    "fwd_gflop_s", "step_gflop_s", "peak_gflop_s", "peak_share", "mfu", "mfu_peak", "visible_patches", "patches",
    "threads", "wall_s", "memory_method",
)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def environment(settings) -> dict:
    cuda = torch.cuda.is_available()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": settings.threads or torch.get_num_threads(),
        "gomp_spincount": getattr(settings, "gomp_spincount", None),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "git_commit": git_commit(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages at the end of the run (a shared machine's timings move with it)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cell(value, digits: int = 2) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") if row.get(k) is not None else "" for k in COLUMNS})


def _percent(value) -> str:
    return "n/a" if value is None or value == "" else f"{100 * value:.1f}%"


def _peaks_line(peaks: dict | None) -> str:
    if not peaks or not peaks.get("used"):
        return "Matmul peak: not measured (measure_peak=false)."
    parts = []
    for dtype, used in peaks["used"].items():
        seen = [f"{peaks[k][dtype]['gflop_s']:.0f}" for k in ("before", "after") if dtype in peaks.get(k, {})]
        parts.append(f"{dtype} {used:.0f} GFLOP/s (before / after the grid: {' / '.join(seen)})")
    size = next(iter(next(iter(p.values())) for p in (peaks.get("before"), peaks.get("after")) if p))["size"]
    return (f"Matmul peak of this machine ({size}^3 `a @ b`, median of timed calls, measured before and after "
            f"the grid; the larger is used): " + "; ".join(parts) + ".")


def markdown_table(rows: list[dict], env: dict, peaks: dict | None = None) -> str:
    methods = sorted({r["memory_method"] for r in rows if r.get("memory_method")})
    mfu_against = sorted({r["mfu_peak"] for r in rows if r.get("mfu_peak")})
    lines = [
        f"Pretraining benchmark (FCMAE; SparK for resnet*), {rows[0]['image_size'] if rows else '?'}px, "
        f"device {env['gpu'] or env['cpu']}, "
        f"{env['threads']} threads, torch {env['torch']}, commit {env['git_commit']}, {env['date']}, "
        f"load average at the end {env.get('load_average')}.",
        "",
        "Times: median (IQR) of the timed calls; fwd = training forward, step = forward + backward + "
        "AdamW. GMACs per image of one forward: dense = whole image, useful = visible patches only "
        "(analytic), executed = FlopCounterMode + the backend's uncounted kernels. "
        "GFLOP/s from executed FLOPs (a step counted as 3 forwards). "
        "Share of peak = step GFLOP/s over the matmul peak in the same dtype; "
        f"MFU = useful FLOP/s over the {' / '.join(mfu_against) or 'n/a'} peak. "
        f"Peak memory: {'; '.join(methods) or 'n/a'}.",
        "",
        _peaks_line(peaks),
        "",
        "| backend | variant | mask | batch | dtype | fwd ms | step ms | step img/s | step peak MiB | "
        "dense GMACs | useful GMACs | executed GMACs | step GFLOP/s | share of peak | MFU | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] == "ok":
            lines.append(
                f"| {r['backend']} | {r['variant']} | {r['mask_ratio']} | {r['batch_size']} | {r['dtype']} | "
                f"{r['fwd_ms']:.1f} ({r['fwd_ms_iqr']:.1f}) | {r['step_ms']:.1f} ({r['step_ms_iqr']:.1f}) | "
                f"{r['step_images_s']:.1f} | {_cell(r.get('step_peak_mib'), 0)} | {r['dense_gmacs']:.4g} | "
                f"{r['useful_gmacs']:.4g} | {r['executed_gmacs']:.4g} | {r['step_gflop_s']:.1f} | "
                f"{_percent(r.get('peak_share'))} | {_percent(r.get('mfu'))} | ok |"
            )
        else:
            reason = str(r.get("reason", "")).replace("|", "/")
            lines.append(
                f"| {r['backend']} | {r['variant']} | {r['mask_ratio']} | {r['batch_size']} | {r['dtype']} | "
                f"| | | | | | | | | | {r['status']}: {reason} |"
            )
    return "\n".join(lines) + "\n"


def comparison_table(rows: list[dict], reference: str = "dense_masked") -> str:
    """Each other backend beside the reference in the same configuration and dtype: step times,
    the speed-up next to its FLOP bound (dense over useful FLOPs), each one's share of the
    matmul peak. Empty when the reference did not run."""
    ok = [r for r in rows if r["status"] == "ok"]
    config = ("variant", "mask_ratio", "batch_size", "dtype")
    ref = {tuple(r[k] for k in config): r for r in ok if r["backend"] == reference}
    others = [r for r in ok if r["backend"] != reference and tuple(r[k] for k in config) in ref]
    if not others:
        return ""
    lines = [
        f"| backend | variant | mask | batch | dtype | step ms: {reference} / backend | speed-up | FLOP bound | "
        f"step GFLOP/s: {reference} / backend | share of peak: {reference} / backend |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(others, key=lambda r: (r["backend"], r["dtype"], r["variant"], r["mask_ratio"], r["batch_size"])):
        d = ref[tuple(r[k] for k in config)]
        lines.append(
            f"| {r['backend']} | {r['variant']} | {r['mask_ratio']} | {r['batch_size']} | {r['dtype']} | "
            f"{d['step_ms']:.0f} / **{r['step_ms']:.0f}** | {d['step_ms'] / r['step_ms']:.2f}x | "
            f"{d['dense_gmacs'] / r['useful_gmacs']:.2f}x | {d['step_gflop_s']:.0f} / {r['step_gflop_s']:.0f} | "
            f"{_percent(d.get('peak_share'))} / **{_percent(r.get('peak_share'))}** |")
    return "\n".join(lines) + "\n"


def _series_label(row: dict, multi_batch: bool, multi_dtype: bool) -> str:
    label = row["backend"]
    if multi_batch:
        label += f" b{row['batch_size']}"
    if multi_dtype:
        label += f" {row['dtype']}"
    return label


def pyplot():
    """matplotlib.pyplot drawing into files only (no display): the bench's plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """throughput_vs_mask_ratio.png and speedup_over_dense_masked.png (when dense_masked ran)."""
    plt = pyplot()
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return []
    variants = sorted({r["variant"] for r in ok}, key=[r["variant"] for r in ok].index)
    multi_batch = len({r["batch_size"] for r in ok}) > 1
    multi_dtype = len({r["dtype"] for r in ok}) > 1
    # one colour per series in both plots, so a backend looks the same everywhere
    labels = list(dict.fromkeys(_series_label(r, multi_batch, multi_dtype) for r in ok))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    written = []

    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        series: dict[str, list] = {}
        for r in ok:
            if r["variant"] == variant:
                series.setdefault(_series_label(r, multi_batch, multi_dtype), []).append(
                    (r["mask_ratio"], r["step_images_s"]))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        ax.set(title=f"{variant}: training step", xlabel="mask ratio", ylabel="images / s")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = out_dir / "throughput_vs_mask_ratio.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)

    def key(r):
        return (r["variant"], r["mask_ratio"], r["batch_size"], r["dtype"])

    reference = {key(r): r["step_ms"] for r in ok if r["backend"] == "dense_masked"}
    others = [r for r in ok if r["backend"] != "dense_masked" and key(r) in reference]
    if not others:
        return written
    # the FLOP bound: the speed-up if time followed the useful FLOPs (dense over useful)
    bounds = {}
    for r in ok:
        bounds.setdefault(r["variant"], {})[r["mask_ratio"]] = r["dense_gmacs"] / r["useful_gmacs"]
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        series = {}
        for r in others:
            if r["variant"] == variant:
                series.setdefault(_series_label(r, multi_batch, multi_dtype), []).append(
                    (r["mask_ratio"], reference[key(r)] / r["step_ms"]))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[label])
        bound = sorted(bounds.get(variant, {}).items())
        ax.plot([b[0] for b in bound], [b[1] for b in bound], color="black", linestyle=":", marker="x",
                label="FLOP bound (dense / useful)")
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        ax.set(title=f"{variant}: speed-up over dense_masked", xlabel="mask ratio", ylabel="x (step time)")
        ax.grid(alpha=0.3)
        if series:
            ax.legend()
    fig.tight_layout()
    path = out_dir / "speedup_over_dense_masked.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def write_results(rows: list[dict], settings, out_dir: Path, plots: bool = True,
                  peaks: dict | None = None) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment(settings)
    env["matmul_peaks"] = peaks or {}
    env["load_average"] = _load_average()
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "md": out_dir / "results.md"}
    write_csv(rows, paths["csv"])
    from dataclasses import asdict

    with open(paths["json"], "w") as f:
        json.dump({"environment": env, "settings": asdict(settings), "results": rows}, f, indent=2)
    paths["md"].write_text(markdown_table(rows, env, peaks))
    # beside the eager reference, and beside it under torch.compile where that ran
    summary = "\n".join(t for t in (comparison_table(rows), comparison_table(rows, f"dense_masked{COMPILED}")) if t)
    if summary:
        paths["summary"] = out_dir / "summary.md"
        paths["summary"].write_text(f"{_peaks_line(peaks)}\n\n{summary}")
    if plots:
        for p in write_plots(rows, out_dir):
            paths[p.stem] = p
    return paths
