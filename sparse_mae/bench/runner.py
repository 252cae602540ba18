"""Plan and run the benchmark grid; every configuration ends as one row.

A row's status is `ok`, `skipped` (backend not registered / not installed, dtype not
supported by the backend), `oom` (out of memory, or over the memory guard) or `error`.
One configuration failing never stops the others. The machine's matmul peak per dtype
is measured before and after the grid (peak.py); each row's share of peak is against the
larger of the two, so a load that comes and goes during the run cannot flatter a share.
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import torch

from sparse_mae.backends import backend_availability, get_backend, list_backends
from sparse_mae.bench.measure import is_out_of_memory, measure_configuration
from sparse_mae.config import COMPILED, BenchConfig, validate
from sparse_mae.train.amp import SLOW_BF16_CPU, cpu_has_fast_bf16

GRID_KEYS = ("backend", "variant", "mask_ratio", "batch_size", "dtype")


def settings_from(cfg) -> BenchConfig:
    """The bench config (composed, or any mapping of its keys: the rest are the schema's
    defaults) as its schema object, ranges checked, with the grid spelled out: `backends`
    as a list of names, `variants` / `dtypes` as plain strings, `device` resolved."""
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg)
    validate(merged)
    settings = OmegaConf.to_object(merged)
    settings.backends = list_backends() if settings.backends in ("all", None) else [
        str(b) for b in _as_list(settings.backends)]
    settings.variants = [str(v) for v in settings.variants]
    settings.dtypes = [str(d) for d in settings.dtypes]
    settings.device = str(settings.device)
    if settings.device == "auto":
        settings.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif settings.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device=cuda but no CUDA GPU is visible; use device=auto")
    return settings


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, int, float)):
        return [value]
    return list(value)


def skip_reason(backend: str, dtype: str, device: str) -> str | None:
    """Why this backend/dtype cannot run here, or None."""
    registered = list_backends()
    backend = backend.removesuffix(COMPILED)
    if backend not in registered:
        return f"backend {backend!r} is not registered; registered backends: {', '.join(registered)}"
    available, reason = backend_availability(backend)
    if not available:
        return f"backend {backend!r} is not installed: {reason}"
    if dtype != "float32":
        allowed = get_backend(backend).autocast_devices
        if device not in allowed:
            return f"backend {backend!r} has no {dtype} autocast on {device} (autocast_devices={list(allowed)})"
    return slow_dtype_reason(dtype, device)


def slow_dtype_reason(dtype: str, device: str) -> str | None:
    """Why timing `dtype` here would only time a slow fallback (bf16 on a CPU without it), or None."""
    if dtype == "bfloat16" and device == "cpu" and not cpu_has_fast_bf16():
        return f"{SLOW_BF16_CPU}; time dtypes=[float32] here, bf16 on a CPU with AVX-512 or a GPU"
    return None


def plan(settings: BenchConfig) -> list[dict]:
    """Every configuration of the grid as a spec dict (the measure worker's input)."""
    device = settings.device
    specs = []
    for backend, variant, ratio, batch, dtype in itertools.product(
        settings.backends, settings.variants, settings.mask_ratios, settings.batch_sizes, settings.dtypes
    ):
        specs.append({
            "backend": backend, "variant": variant, "image_size": settings.image_size, "mask_ratio": ratio,
            "batch_size": batch, "dtype": dtype, "device": device, "warmup": settings.warmup,
            "repeats": settings.repeats, "threads": settings.threads, "seed": settings.seed,
            "memory_guard_gib": settings.memory_guard_gib,
        })
    return specs


def run_isolated(spec: dict, timeout_s: float, module: str = "sparse_mae.bench.measure",
                 gomp_spincount: int | None = None) -> dict:
    """Measure in a fresh interpreter; a crash or timeout becomes an `error` row."""
    env = dict(os.environ)
    if gomp_spincount is not None:
        # read when the worker loads OpenMP; a wait policy would override the spin count
        env["GOMP_SPINCOUNT"] = str(gomp_spincount)
        env.pop("OMP_WAIT_POLICY", None)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", module], input=json.dumps(spec),
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {"status": "error", "reason": f"timed out after {timeout_s:.0f} s (raise timeout_s)"}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    # the kernel's OOM killer ends a process with SIGKILL
    status = "oom" if proc.returncode == -9 else "error"
    return {"status": status, "reason": f"worker exited with {proc.returncode}: {tail[-300:]}"}


def run_in_process(spec: dict) -> dict:
    try:
        return {"status": "ok", **measure_configuration(spec)}
    except Exception as error:  # one configuration failing must not stop the rest
        status = "oom" if is_out_of_memory(error) else "error"
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return {"status": status, "reason": f"{type(error).__name__}: {str(error).strip()[:300]}"}


def add_derived(row: dict, card_peak_tflops: float | None, measured_peak_gflop_s: float | None) -> dict:
    """Achieved GFLOP/s (a training step counted as 3 forwards: the usual convention, since
    FlopCounterMode's conv backward formula ignores groups) and the shares of peak:

    - peak_share: executed FLOP/s over this machine's measured matmul peak in the row's
      dtype (how busy the engine keeps the hardware; the goals of the native engine);
    - mfu: useful FLOP/s (the visible patches' work only) over the card's peak where one is
      known (GPU table or peak_tflops), else over the measured matmul peak (a CPU "MFU")."""
    if row.get("status") != "ok":
        return row
    flop_per_mac = 2
    row["fwd_gflop_s"] = flop_per_mac * row["executed_gmacs"] * row["fwd_images_s"]
    row["step_gflop_s"] = 3 * flop_per_mac * row["executed_gmacs"] * row["step_images_s"]
    useful_step_gflop_s = 3 * flop_per_mac * row["useful_gmacs"] * row["step_images_s"]
    row["peak_gflop_s"] = measured_peak_gflop_s
    row["peak_share"] = row["step_gflop_s"] / measured_peak_gflop_s if measured_peak_gflop_s else None
    mfu_peak = card_peak_tflops * 1e3 if card_peak_tflops else measured_peak_gflop_s
    row["mfu"] = useful_step_gflop_s / mfu_peak if mfu_peak else None
    row["mfu_peak"] = "card" if card_peak_tflops else ("measured matmul" if measured_peak_gflop_s else None)
    return row


def known_peak_tflops(device: str, dtype: str) -> float | None:
    """Dense tensor-core peaks of GPUs we know (TF32 for float32); None elsewhere."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    table = {"H100": {"float32": 494.5, "bfloat16": 989.4, "float16": 989.4},
             "H200": {"float32": 494.5, "bfloat16": 989.4, "float16": 989.4},
             "A100": {"float32": 156.0, "bfloat16": 312.0, "float16": 312.0}}
    for key, peaks in table.items():
        if key in name:
            return peaks[dtype]
    return None


def measure_peaks(settings: BenchConfig, log=print) -> dict[str, dict]:
    """{dtype: matmul_peak result} for the dtypes of the grid, on its device and threads."""
    from sparse_mae.bench.peak import matmul_peak

    device = settings.device
    peaks = {}
    for dtype in settings.dtypes:
        slow = slow_dtype_reason(dtype, device)
        if slow:
            log(f"matmul peak {dtype}: not measured, {slow}")
            continue
        spec = {"dtype": dtype, "device": device, "size": settings.peak_size, "threads": settings.threads}
        if settings.isolate:
            result = run_isolated(spec, settings.timeout_s, module="sparse_mae.bench.peak",
                                  gomp_spincount=settings.gomp_spincount)
            if "gflop_s" not in result:
                log(f"matmul peak {dtype}: {result.get('reason', result)}")
                continue
        else:
            result = matmul_peak(**spec)
        peaks[dtype] = result
        log(f"matmul peak {dtype} ({settings.peak_size}^3 on {device}): {result['gflop_s']:.1f} GFLOP/s "
            f"(best {result['best_gflop_s']:.1f})")
    return peaks


def run_bench(settings: BenchConfig, log=print, peaks: dict | None = None) -> list[dict]:
    """Run the grid. peaks (optional, filled in): {"before": {dtype: ...}, "after": {...},
    "used": {dtype: GFLOP/s}}, the matmul peaks the shares are computed against."""
    peaks = {} if peaks is None else peaks
    if settings.measure_peak:
        peaks["before"] = measure_peaks(settings, log)
    rows = []
    specs = plan(settings)
    for i, spec in enumerate(specs, 1):
        row = {k: spec[k] for k in ("backend", "variant", "image_size", "mask_ratio", "batch_size", "dtype", "device")}
        started = time.perf_counter()
        reason = skip_reason(spec["backend"], spec["dtype"], spec["device"])
        if reason is not None:
            row.update(status="skipped", reason=reason)
        else:
            measured = (run_isolated(spec, settings.timeout_s, gomp_spincount=settings.gomp_spincount)
                        if settings.isolate else run_in_process(spec))
            row.update(measured)
        row["wall_s"] = time.perf_counter() - started  # the whole configuration, set-up included
        rows.append(row)
        label = " ".join(f"{k}={row[k]}" for k in GRID_KEYS)
        if row["status"] == "ok":
            log(f"[{i}/{len(specs)}] {label}: step {row['step_ms']:.1f} ms ({row['step_images_s']:.1f} img/s), "
                f"fwd {row['fwd_ms']:.1f} ms, step peak {_fmt(row.get('step_peak_mib'))} MiB")
        else:
            log(f"[{i}/{len(specs)}] {label}: {row['status']}: {row.get('reason', '')}")
    if settings.measure_peak:
        peaks["after"] = measure_peaks(settings, log)
    # the larger of the two: a share never looks better because the peak was measured under load
    peaks["used"] = {d: max(p[d]["gflop_s"] for p in (peaks.get("before", {}), peaks.get("after", {})) if d in p)
                     for d in settings.dtypes if any(d in peaks.get(k, {}) for k in ("before", "after"))}
    for row in rows:
        card = settings.peak_tflops or known_peak_tflops(row["device"], row["dtype"])
        add_derived(row, card, peaks["used"].get(row["dtype"]))
    return rows


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.0f}"
