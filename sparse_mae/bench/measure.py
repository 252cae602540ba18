"""Measure one benchmark configuration: backend x variant x mask ratio x batch x dtype.

`measure_configuration(spec)` builds the pretraining model (FCMAE for a ConvNeXt V2 variant,
SparK for a ResNet), then measures
- executed forward MACs: torch's FlopCounterMode over one real forward plus the backend's
  `uncounted_macs` hooks for kernels the counter cannot see (encoder and decoder);
- forward time (the training loss's forward, autograd on) and step time: the engine's own
  step (train.step.train_step: FCMAE loss with per-sample masks from seeds, backward, the
  gradient norm, AdamW with the pretraining recipe's groups, betas and weight decay; SparK
  runs the same loss call and groups, as `sparse-mae pretrain model=resnet*` does):
  `warmup` untimed calls, then `repeats` timed ones (CUDA events on GPU);
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
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_mae.bench.timing import median_iqr, time_calls
from sparse_mae.config import COMPILED
from sparse_mae.models import RESNET_VARIANTS, pretraining_model_name
from sparse_mae.models.convnextv2 import PATCH

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


# -- one configuration ------------------------------------------------------------------------


class PretrainStep:
    """The training step the engine runs (train.step.train_step with the FCMAE / SparK loss, the
    pretraining app's parameter groups and the schema's AdamW recipe), on random images of
    one configuration. Call k draws the batch's masks from seeds k * batch .. (k+1) * batch,
    as training draws them from sample seeds, so no engine can cache one mask's indices."""

    def __init__(self, spec: dict):
        from sparse_mae.build import create_model
        from sparse_mae.config import PretrainConfig
        from sparse_mae.train.schedule import peak_lr
        from sparse_mae.train.step import build_optimizer, fcmae_param_groups

        torch.manual_seed(spec["seed"])
        self.device = torch.device(spec["device"])
        self.batch_size, self.mask_ratio = spec["batch_size"], spec["mask_ratio"]
        size = spec["image_size"]
        backend = spec["backend"].removesuffix(COMPILED)
        self.model = create_model(pretraining_model_name(spec["variant"]), backend=backend).to(self.device)
        self.model.train()
        # backend+compile: the loss runs the model under torch.compile (compiled in the warm-up
        # calls); the optimizer, clipping and the rest of the step are the engine's as for any row
        self.loss_model = torch.compile(self.model) if spec["backend"].endswith(COMPILED) else self.model
        recipe = PretrainConfig()  # the defaults a pretraining run starts from
        self.clip_grad = recipe.clip_grad
        self.optimizer = build_optimizer(fcmae_param_groups(self.model, recipe.optim.weight_decay), recipe.optim,
                                         peak_lr(recipe.optim, self.batch_size), self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.imgs = torch.randn(self.batch_size, 3, size, size, device=self.device)
        dtype = DTYPES[spec["dtype"]]
        self.autocast_dtype = None if dtype == torch.float32 else dtype

    def batch(self, k: int) -> dict:
        seeds = torch.arange(k * self.batch_size, (k + 1) * self.batch_size) + 1_000_003 * self.batch_size
        return {"image": self.imgs, "seed": seeds}

    def mask(self, k: int) -> torch.Tensor:
        from sparse_mae.models.fcmae import masks_from_seeds

        return masks_from_seeds(self.batch(k)["seed"], self.model.patchify(self.imgs).shape[1], self.mask_ratio)

    def loss(self, model, batch: dict, micro: int = 0) -> torch.Tensor:
        from sparse_mae.train.step import fcmae_loss

        # the step passes self.model; a +compile row runs it through its compiled wrapper
        return fcmae_loss(self.loss_model if model is self.model else model, batch, self.mask_ratio)

    def forward(self, k: int, eager: bool = False) -> torch.Tensor:
        """The loss of batch k; `eager`: without torch.compile (FlopCounterMode counts eager ops)."""
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            return self.loss(self.model, self.batch(k)) if not eager else self.eager_loss(self.batch(k))

    def eager_loss(self, batch: dict) -> torch.Tensor:
        from sparse_mae.train.step import fcmae_loss

        return fcmae_loss(self.model, batch, self.mask_ratio)

    def step(self, k: int):
        from sparse_mae.train import step as training

        return training.train_step(self.model, self.loss, [self.batch(k)], self.optimizer, self.params,
                                   clip_grad=self.clip_grad, autocast_dtype=self.autocast_dtype)


def measure_configuration(spec: dict) -> dict:
    """spec keys: backend, variant, image_size, mask_ratio, batch_size, dtype, device,
    warmup, repeats, threads, seed, memory_guard_gib, fresh_process.
    -> measured fields (times in ms, memory in MiB, MACs per image in G)."""
    from sparse_mae.flops import fcmae_gmacs, spark_gmacs

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    run = PretrainStep(spec)
    model, imgs, device, batch = run.model, run.imgs, run.device, run.batch_size
    grid = imgs.shape[-1] // PATCH
    forward, step = run.forward, run.step
    mask0 = run.mask(0).to(device)

    result: dict = {}
    with FlopCounterMode(display=False) as counter:
        run.forward(0, eager=True)
    uncounted = model.uncounted_macs(imgs, mask0)
    result["executed_gmacs"] = (counter.get_total_flops() / 2 + uncounted) / batch / 1e9
    gmacs = spark_gmacs if spec["variant"] in RESNET_VARIANTS else fcmae_gmacs
    analytic = gmacs(model, tuple(imgs.shape[-2:]), mask=mask0)
    result["dense_gmacs"] = analytic.total_dense
    result["useful_gmacs"] = analytic.total_useful
    result["visible_patches"] = int((mask0[0] == 0).sum())
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
