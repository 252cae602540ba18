"""Measure one benchmark configuration: backend x variant x mask ratio x batch x dtype.

`measure_configuration(spec)` builds the FCMAE model, then measures
- executed forward MACs: torch's FlopCounterMode over one real forward plus the backend's
  `uncounted_macs` hook for kernels the counter cannot see;
- forward time (training forward, autograd on) and step time (forward + backward + AdamW
  step): `warmup` untimed calls, then `repeats` timed ones (CUDA events on GPU);
- peak memory of the forward and of the step, on top of what existed before them (model,
  batch): CUDA max allocated on GPU; on CPU the peak RSS (VmHWM, reset through
  /proc/self/clear_refs) minus the RSS before.

Run as `python -m sparse_mae.bench.measure` it reads one spec as JSON on stdin and prints
one JSON result line: the runner uses it to give every configuration a fresh process.
"""
from __future__ import annotations

import contextlib
import json
import resource
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 2**20


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)


# -- CPU memory -----------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryProbe:
    """Peak memory added by a block of work, in MiB."""

    def __init__(self, device: torch.device, fresh_process: bool):
        self.device = device
        self.fresh_process = fresh_process
        if device.type == "cuda":
            self.method = "CUDA max_memory_allocated minus memory_allocated before"
        elif _reset_peak_rss():
            self.method = "CPU peak RSS (VmHWM reset via /proc/self/clear_refs) minus RSS before"
        elif fresh_process:
            self.method = "CPU peak RSS of a fresh process (getrusage ru_maxrss) minus RSS before"
        else:
            self.method = "not measured (no /proc/self/clear_refs and not isolated)"

    @contextlib.contextmanager
    def measure(self, result: dict, key: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            yield
            torch.cuda.synchronize(self.device)
            result[key] = (torch.cuda.max_memory_allocated(self.device) - before) / MIB
            return
        before_kib = _proc_status_kib("VmRSS")
        can_reset = _reset_peak_rss()
        yield
        if before_kib is None:
            result[key] = None
        elif can_reset:
            result[key] = (_proc_status_kib("VmHWM") - before_kib) / 1024
        elif self.fresh_process:  # ru_maxrss is the whole process's peak: only one probe is exact
            result[key] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_kib / 1024
        else:
            result[key] = None


@contextlib.contextmanager
def memory_guard(device: torch.device, guard_gib: float | None):
    """Make allocations beyond `guard_gib` more than now fail (-> recorded as out of memory).
    CPU: RLIMIT_AS (address space, so a little stricter than RSS); CUDA: the caching
    allocator's per-process memory fraction."""
    if not guard_gib:
        yield
        return
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        allowed = torch.cuda.memory_allocated(device) + guard_gib * 2**30
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / total), device)
        try:
            yield
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
        return
    vm_kib = _proc_status_kib("VmSize")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if vm_kib is None:
        yield
        return
    limit = vm_kib * 1024 + int(guard_gib * 2**30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


# -- timing -------------------------------------------------------------------------------


def time_calls(fn, warmup: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` calls of fn(k), after `warmup` untimed ones."""
    for k in range(warmup):
        fn(k)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for k in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(warmup + k)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return times
    for k in range(repeats):
        t0 = time.perf_counter()
        fn(warmup + k)
        times.append(time.perf_counter() - t0)
    return times


def median_iqr(times: list[float]) -> tuple[float, float]:
    if len(times) < 2:
        return times[0], 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return statistics.median(times), q3 - q1


# -- one configuration ------------------------------------------------------------------------


def measure_configuration(spec: dict) -> dict:
    """spec keys: backend, variant, image_size, mask_ratio, batch_size, dtype, device,
    warmup, repeats, threads, seed, memory_guard_gib, fused_adamw, fresh_process.
    -> measured fields (times in ms, memory in MiB, MACs per image in G)."""
    from sparse_mae.flops import fcmae_gmacs
    from sparse_mae.models import create_model
    from sparse_mae.models.fcmae import random_mask

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(spec["seed"])
    device = torch.device(spec["device"])
    size, batch = spec["image_size"], spec["batch_size"]
    grid = size // 32
    model = create_model(
        f"fcmae_convnextv2_{spec['variant']}", backend=spec["backend"], mask_ratio=spec["mask_ratio"]
    ).to(device)
    model.train()
    # fused: one kernel over all parameters instead of ~8 ops per tensor (the for-loop version
    # on CPU costs more than a tenth of a small model's step); the same for every backend
    fused = bool(spec.get("fused_adamw", True)) and device.type in ("cpu", "cuda")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=fused)
    imgs = torch.randn(batch, 3, size, size, device=device)
    generator = torch.Generator().manual_seed(spec["seed"])
    # a few masks cycled through, so no engine can cache one mask's index structures
    masks = [random_mask(batch, grid * grid, spec["mask_ratio"], generator=generator).to(device) for _ in range(4)]
    dtype = DTYPES[spec["dtype"]]
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )

    def forward(k: int):
        with autocast:
            return model(imgs, mask=masks[k % len(masks)])[0]

    def step(k: int):
        loss = forward(k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    result: dict = {}
    with FlopCounterMode(display=False) as counter:
        forward(0)
    uncounted = model.backend.uncounted_macs(model.encoder, imgs, masks[0].reshape(batch, grid, grid))
    result["executed_gmacs"] = (counter.get_total_flops() / 2 + uncounted) / batch / 1e9
    analytic = fcmae_gmacs(model, (size, size), mask=masks[0])
    result["dense_gmacs"] = analytic.total_dense
    result["useful_gmacs"] = analytic.total_useful
    result["visible_patches"] = int((masks[0][0] == 0).sum())
    result["patches"] = grid * grid

    probe = MemoryProbe(device, spec.get("fresh_process", False))
    result["memory_method"] = probe.method
    warmup, repeats = spec["warmup"], spec["repeats"]
    with memory_guard(device, spec.get("memory_guard_gib")):
        with probe.measure(result, "fwd_peak_mib"):
            fwd_times = time_calls(forward, warmup, repeats, device)
        with probe.measure(result, "step_peak_mib"):
            step_times = time_calls(step, warmup, repeats, device)
    result["fwd_ms"], result["fwd_ms_iqr"] = (1e3 * t for t in median_iqr(fwd_times))
    result["step_ms"], result["step_ms_iqr"] = (1e3 * t for t in median_iqr(step_times))
    result["fwd_images_s"] = batch / (result["fwd_ms"] / 1e3)
    result["step_images_s"] = batch / (result["step_ms"] / 1e3)
    result["threads"] = torch.get_num_threads()
    return result


def main() -> int:
    """Worker: one spec (JSON) on stdin -> one JSON line on stdout, status ok | oom | error."""
    spec = json.loads(sys.stdin.read())
    try:
        out = {"status": "ok", **measure_configuration({**spec, "fresh_process": True})}
    except Exception as error:  # reported back to the runner; one bad configuration never stops the bench
        status = "oom" if is_out_of_memory(error) else "error"
        out = {"status": status, "reason": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
