"""The training engine: one step loop for every app (as MAE's engine_pretrain.py).

An app supplies a `TrainTask` (its model, dataset, parameter groups, loss and hooks) and
calls `train(cfg, task_factory, run_dir)`. The engine owns, once:

- the run directory: lock, fresh-start refusal, clean-up after a kill, metrics file;
- resume: the newest checkpoint that verifies (rank 0 decides, every rank loads the same
  step and checks it), model + optimizer + RNG + loop counters, so a resumed run equals
  the uninterrupted one bit for bit on CPU;
- per optimizer step: lr from the schedule, `accum_iter` micro-batches (DDP syncs on the
  last), bf16 autocast, clipping, the non-finite policy, logging, checkpoint cadence.

Non-finite policy: a step whose loss (mean over ranks) or gradient norm is not finite is
skipped (no weight update) and counted; `nonfinite.max_in_a_row` such steps in a row stop
the run, naming the step and the last good checkpoint. Weights that are non-finite after
an optimizer step (a fault inside the optimizer) stop the run at once, before anything is
saved. Every rank sees the same all-reduced numbers, so all ranks decide alike.
"""
from __future__ import annotations

import math
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from sparse_mae.config import check_output_dir, validate
from sparse_mae.data.loader import make_loader, to_model
from sparse_mae.data.identity import data_identity
from sparse_mae.io import atomic_write_bytes
from sparse_mae.train.checkpoint import find_latest, save_checkpoint
from sparse_mae.train.distributed import (
    DistInfo,
    any_rank,
    barrier,
    broadcast_from_main,
    cleanup_distributed,
    init_distributed,
    run_on_main,
)
from sparse_mae.errors import ConfigError, RunStopped, TrainingDiverged
from sparse_mae.train.metrics import RunLogger
from sparse_mae.train.rng import capture_rng_state, restore_rng_state, seed_everything
from sparse_mae.train.resume import choose_checkpoint, load_on_every_rank
from sparse_mae.train.rundir import RunDirectory
from sparse_mae.train.sampler import ResumableDistributedSampler
from sparse_mae.train import schedule
from sparse_mae.train.schedule import set_lr, warmup_cosine_lr
from sparse_mae.train import step as training_step
from sparse_mae.train.signals import PhaseAbandoned, RunInterrupted, StopRequest, ignore_in_worker, parse_signals

# Metrics that measure the machine, not the training: they differ between runs of the
# same training (and between an interrupted run and an uninterrupted one).
TIMING_METRICS = ("time", "img_per_s", "knn/seconds")


class TrainTask:
    """What an app gives the engine. `model` is the module trained (unwrapped, on the
    device); `dataset` items are requested as (index, sample seed) and are dicts with a
    "skipped" count of unreadable files (see sparse_mae.data)."""

    name = "train"
    amp = False  # bf16 autocast for the loss (the app resolves `amp` for its model)
    model: torch.nn.Module
    dataset: torch.utils.data.Dataset

    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch: dict, step: int, micro: int) -> torch.Tensor:
        """The loss of one micro-batch (`model` may be DDP-wrapped; batch tensors are on the device)."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the start of the log."""
        return ""

    def init_weights(self, log: Callable[[str], None]) -> None:
        """A fresh run only: load starting weights (e.g. `init=`), before the optimizer exists."""

    def after_optimizer_step(self, step: int) -> None:
        """Every rank, after each weight update (e.g. the EMA)."""

    def after_step(self, run: Run, step: int, last: bool) -> None:
        """Every rank, after the step is logged and before it is checkpointed (evaluation,
        pictures); rank-0-only work checks `run.dist.is_main`. A long phase reads its batches
        through `until_stopped(..., run.stop)`, so a stop signal abandons it at the next batch
        (PhaseAbandoned). An abandoned or failed hook leaves the step checkpointed with its
        hooks pending: they run again, at the same step, after resume, so a hook must record
        its results only once it has finished."""

    def state_dict(self) -> dict:
        """Extra checkpoint entries (top level of the checkpoint dict)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> dict:
        """Values for the wandb summary at the end."""
        return {}


@dataclass
class RunResult:
    run_dir: Path
    checkpoint: Path | None
    metrics: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # mean loss of every step taken here (None: skipped)
    skipped_files: int = 0  # damaged samples met (each once), over the whole run
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm, over the whole run


@dataclass
class Counters:
    """The loop's state beyond model, optimizer and RNG; saved in every checkpoint."""

    step: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0
    damaged: list[int] = field(default_factory=list)  # damaged samples met by any rank up to the last save (sorted)
    window_loss: float = 0.0  # the logging window not yet written
    window_steps: int = 0
    hooks_pending: bool = False  # the task's after_step hooks of `step` were abandoned or failed: run them first


@dataclass
class Run:
    """One training run as the hooks see it."""

    cfg: DictConfig
    dist: DistInfo
    dir: RunDirectory
    logger: RunLogger
    amp: bool
    steps_per_epoch: int
    total_steps: int
    stop: StopRequest  # `until_stopped(batches, run.stop)` in a long hook


def align_grad_strides(model: torch.nn.Module) -> None:
    """Give each gradient its parameter's strides where they differ only on size-1 dims (a
    free view: same memory order). Conv backward writes (C,1,7,7) depthwise and 1x1 conv
    weight grads with other strides on those dims, which DDP reports ("Grad strides do not
    match bucket view strides") and pays for with a copy per step."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(_restride_like(p))


def _restride_like(param: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        if grad.stride() == param.stride() or grad.shape != param.shape:
            return grad
        if all(g == s for g, s, n in zip(grad.stride(), param.stride(), param.shape) if n != 1):
            return grad.as_strided(grad.shape, param.stride())
        return grad

    return hook


def weights_finite(params: list[torch.Tensor]) -> bool:
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(params, norm_type=2.0)))


# -- the run -----------------------------------------------------------------------------

def train(cfg: DictConfig, make_task: Callable[[DictConfig, DistInfo], TrainTask],
          run_dir: str | Path | None = None) -> tuple[RunResult, TrainTask]:
    """Run (or continue) one training job in `run_dir` (default cfg.output_dir)."""
    validate(cfg)  # composed configs were checked already; this catches values set by hand since
    problem = check_output_dir(cfg.output_dir)
    if problem is not None:
        raise ConfigError(f"invalid config: {problem}")
    # from the start, so a signal during set-up is not lost: the loop stops before its first step
    stop = StopRequest(parse_signals(cfg.stop_signals), log=lambda m: print(m, file=sys.stderr, flush=True)).install()
    try:
        di = init_distributed(cfg.device)
        try:
            # ranks may resolve ${now:...} in different seconds: rank 0's folder wins
            run_dir = Path(broadcast_from_main(str(run_dir if run_dir is not None else cfg.output_dir)))
            return _Engine(cfg, make_task, run_dir, di, stop).run()
        finally:
            cleanup_distributed()
    except RunInterrupted as e:
        print(f"sparse-mae: {e}", file=sys.stderr, flush=True)  # here: the next line may exit
        stop.chain_previous()  # e.g. submitit's requeue handler, now that the checkpoint is safe
        raise
    finally:
        stop.work_is_safe()  # a late signal must not turn a finished (or stopped) run into a killed one
        stop.uninstall()


class _Engine:
    """One run on one rank. Its whole state, declared here; set in __init__ (what the run is),
    _run (what the task and the data make of it) and _loop (the loop's bookkeeping)."""

    # what the run is
    cfg: DictConfig  # with output_dir resolved
    config_yaml: str  # the resolved config, saved beside every checkpoint
    di: DistInfo
    dir: RunDirectory
    make_task: Callable[[DictConfig, DistInfo], TrainTask]
    stop: StopRequest
    data_identity: dict | None  # rank 0: what data.root holds (data/identity.py), saved in every checkpoint
    # set up by _run
    task: TrainTask
    run: Run  # what the task's hooks see
    logger: RunLogger
    sampler: ResumableDistributedSampler
    optimizer: torch.optim.Optimizer
    params: list[torch.Tensor]  # the trained parameters (clipping, the finiteness check)
    train_model: torch.nn.Module  # task.model, DDP-wrapped under DDP
    effective_batch: int  # images per optimizer step over every rank and micro-batch
    steps_per_epoch: int
    total_steps: int  # the schedule's length
    run_steps: int  # where this run stops (max_steps)
    warmup_steps: int
    peak_lr: float
    counters: Counters  # saved in every checkpoint
    run_id: str  # one per run, kept across resumes
    # the loop's bookkeeping (_loop)
    losses: list[float | None]  # every step taken in this process (None: skipped)
    last_checkpoint: Path | None  # written by this process
    saved_step: int
    damaged_here: set[int]  # damaged samples met by this rank since the last save
    window_start: float  # the logging window's start (perf_counter) and step
    window_start_step: int

    def __init__(self, cfg: DictConfig, make_task, run_dir: Path, di: DistInfo, stop: StopRequest | None = None):
        self.stop = stop or StopRequest([])
        self.cfg = OmegaConf.merge(cfg, {"output_dir": str(run_dir)})  # resolved values go beside checkpoints
        self.config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True)
        self.di = di
        self.dir = RunDirectory(run_dir)
        self.make_task = make_task
        self.data_identity = None

    # -- set-up --------------------------------------------------------------------------

    def run(self) -> tuple[RunResult, TrainTask]:
        di = self.di
        run_on_main(self.dir.lock)  # before anything is read or written; released by run() or by death
        try:
            resume_path, resume_state = run_on_main(self._choose_checkpoint, default=(None, None))
            resume_path = broadcast_from_main(resume_path)
            if resume_path is not None:
                resume_path = self.dir.checkpoints / resume_path  # a path of its own stays as it is
            return self._run(resume_path, resume_state if di.is_main else None)
        finally:
            if di.is_main:
                self.dir.unlock()

    def _choose_checkpoint(self) -> tuple[str | None, dict | None]:
        """Rank 0: this start's data identity (saved in every checkpoint), then the checkpoint."""
        self.data_identity = data_identity(self.cfg.data)
        return choose_checkpoint(self.cfg, self.dir, self.data_identity)

    def _run(self, resume_path: Path | None, main_state: dict | None) -> tuple[RunResult, TrainTask]:
        cfg, di = self.cfg, self.di
        seed_everything(cfg.seed + di.rank)
        task = self.make_task(cfg, di)
        model = task.model
        sampler = ResumableDistributedSampler(task.dataset, num_replicas=di.world_size, rank=di.rank, seed=cfg.seed)
        self.effective_batch = cfg.batch_size * di.world_size * cfg.accum_iter
        steps_per_epoch = sampler.num_samples // (cfg.batch_size * cfg.accum_iter)
        if steps_per_epoch == 0:
            raise ValueError(f"the dataset has {len(task.dataset)} images, fewer than one effective batch of "
                             f"{self.effective_batch} (batch_size {cfg.batch_size} x {di.world_size} processes x "
                             f"accum_iter {cfg.accum_iter}); lower batch_size / accum_iter or add images")
        total_steps = cfg.epochs * steps_per_epoch
        self.run_steps = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
        self.warmup_steps = cfg.sched.warmup_steps if cfg.sched.warmup_steps is not None else round(
            cfg.sched.warmup_epochs * steps_per_epoch)
        if self.warmup_steps > total_steps:
            raise ValueError(f"warmup ({self.warmup_steps} steps) is longer than the whole schedule ({total_steps} "
                             f"steps = {cfg.epochs} epochs x {steps_per_epoch}); lower sched.warmup_epochs or "
                             f"raise epochs")
        self.peak_lr = schedule.peak_lr(cfg.optim, self.effective_batch)

        if resume_path is None:
            task.init_weights(lambda m: print(m, flush=True) if di.is_main else None)
        self.optimizer = training_step.build_optimizer(task.param_groups(), cfg.optim, self.peak_lr, di.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.counters = Counters()
        self.run_id = uuid.uuid4().hex
        if resume_path is not None:
            self._load(resume_path, main_state, model, task)
        self.run_id = broadcast_from_main(self.run_id)

        align_grad_strides(model)
        self.train_model = model
        if di.enabled:
            self.train_model = DistributedDataParallel(
                model, device_ids=[di.device.index] if di.device.type == "cuda" else None)

        if di.is_main:
            if resume_path is None:
                self.dir.set_aside_metrics()
            else:
                self.dir.cut_metrics_to(self.counters.step)
            atomic_write_bytes(self.dir.path / "config.yaml", lambda f: f.write(self.config_yaml.encode()))
        self.logger = RunLogger(
            self.dir.path, enabled=di.is_main,
            wandb_cfg=OmegaConf.to_container(cfg.logger, enum_to_str=True) if cfg.logger.name == "wandb" else None,
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), total_steps=self.run_steps,
            initial_step=self.counters.step, progress=cfg.logger.progress, run_id=self.run_id)
        self.run = Run(cfg, di, self.dir, self.logger, task.amp, steps_per_epoch, total_steps, self.stop)
        self.task, self.sampler, self.steps_per_epoch, self.total_steps = task, sampler, steps_per_epoch, total_steps
        start = self.counters.step
        self.logger.write(
            f"{task.name}: {task.describe()}, {di.device} x {di.world_size}, amp {'bf16' if self.run.amp else 'off'}, "
            f"{len(task.dataset)} images, effective batch {self.effective_batch}, lr {self.peak_lr:.3g}, "
            f"{steps_per_epoch} steps/epoch, steps {start} -> {self.run_steps} of {total_steps}"
            + (f", resumed from {resume_path}" if resume_path else ""))
        try:
            self._loop()
            if resume_path is not None and self.counters.step == start:
                self.logger.write(f"nothing to do: the checkpoint is already at step {start} of {self.run_steps}")
            self.logger.summary(task.summary() | {"skipped_files": len(self.counters.damaged),
                                                  "nonfinite_steps": self.counters.nonfinite_steps})
        finally:
            self.logger.close()
        return RunResult(run_dir=self.dir.path, checkpoint=self.last_checkpoint, metrics=self.dir.metrics,
                         steps=self.counters.step, losses=self.losses, skipped_files=len(self.counters.damaged),
                         nonfinite_steps=self.counters.nonfinite_steps), task

    def _load(self, path: Path, main_state: dict | None, model, task: TrainTask) -> None:
        di = self.di
        state = load_on_every_rank(path, main_state, di)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:
            raise ValueError(f"checkpoint {path} does not fit this model (was it written with another model=?): "
                             f"{e}") from e
        self.optimizer.load_state_dict(state["optimizer"])
        task.load_state_dict(state)
        saved = {k: v for k, v in (state.get("engine") or {}).items() if k in Counters.__dataclass_fields__}
        self.counters = Counters(**{**saved, "step": int(state["step"])})
        self.run_id = state.get("run_id") or self.run_id
        rng = state.get("rng") or []
        if len(rng) == di.world_size:
            restore_rng_state(rng[di.rank])
        elif di.is_main:
            print(f"warning: checkpoint written by {len(rng)} process(es), resuming on {di.world_size}: data order "
                  f"and masks are unchanged, only dropout-like RNG streams restart", flush=True)

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> None:
        cfg, di, c = self.cfg, self.di, self.counters
        self.losses: list[float] = []
        self.last_checkpoint = None
        self.saved_step = c.step  # a resumed run's checkpoint, or nothing to save at step 0
        self.damaged_here = set()  # this rank, since the last save
        self.window_start = time.perf_counter()
        self.window_start_step = c.step
        loader = make_loader(self.task.dataset, cfg.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed,
                             sampler=self.sampler, drop_last=True, device=di.device, persistent=True,
                             worker_init_fn=ignore_in_worker(self.stop.signals))
        if self.stop.agreed(di.enabled, di.device):  # a signal during set-up: stop before the first step
            self._stop_on_signal()
        if c.hooks_pending:  # the checkpoint's own step: its evaluation (or pictures) did not finish
            self.logger.write(f"step {c.step}: running the evaluation hooks that did not finish before the stop")
            self._end_of_step(last=c.step == self.run_steps)
        while c.step < self.run_steps:
            epoch = c.step // self.steps_per_epoch
            self.sampler.set_epoch(epoch, start=(c.step % self.steps_per_epoch) * cfg.accum_iter * cfg.batch_size)
            batches = iter(loader)  # the sampler runs in this process: a new epoch reaches persistent workers
            while c.step < min((epoch + 1) * self.steps_per_epoch, self.run_steps):
                self._step(batches)
                last = c.step == self.run_steps
                if c.step % cfg.log_every_steps == 0 or last:
                    self._log()
                self.logger.progress(1)
                self._end_of_step(last)
            del batches

    def _end_of_step(self, last: bool) -> None:
        """Every rank, after a step: the task's hooks, the checkpoint at its cadence, then a stop
        if any rank was signalled. A hook abandoned on a signal, or failing (an unreadable val
        split, say), costs no trained step: the step is checkpointed first, with its hooks
        marked pending, and they run again after resume."""
        cfg, c = self.cfg, self.counters
        failure = None
        try:
            self.task.after_step(self.run, c.step, last)
            abandoned = False
        except PhaseAbandoned:
            abandoned = True
        except Exception as e:  # noqa: BLE001 - raised again below, once the step is saved
            abandoned, failure = True, e
        stop, abandoned, failed = any_rank(self.stop.requested, abandoned, failure is not None, device=self.di.device)
        c.hooks_pending = abandoned or failed
        due = c.step % cfg.checkpoint.every_steps == 0 or last or c.hooks_pending
        if due and c.step > self.saved_step:
            self._save()
            # a signal during the write stops the run now, not a step later (every rank saved)
            stop = any_rank(self.stop.requested, device=self.di.device)[0]
        if failed:
            where = self.last_checkpoint or self._on_disk()
            self.logger.write(f"step {c.step}: the step's evaluation hooks failed; checkpoint {where} holds the step "
                              f"and runs them again after resume=auto")
            raise failure if failure is not None else RunStopped(
                f"step {c.step}: another rank's evaluation hooks failed (its message says why); checkpoint {where}")
        if stop and (not last or c.hooks_pending):  # a run that finished all its work is not stopped
            self._stop_on_signal()

    def _stop_on_signal(self) -> None:
        """Every rank: checkpoint the last finished step (unless it is saved), then stop."""
        c = self.counters
        if c.step > self.saved_step:  # the logging window goes into it unwritten, as at any save
            self._save()
        self.stop.work_is_safe()
        got = self.stop.received
        after = f" {time.monotonic() - self.stop.received_at:.2f} s after the signal" if got else ""
        where = self.last_checkpoint or self._on_disk()
        if c.hooks_pending:
            self.logger.write(f"step {c.step}: evaluation hooks abandoned on the stop signal; they run after resume")
        raise RunInterrupted(  # train() prints it, on every rank
            f"stopped on {got.name if got else 'a signal to another rank'} at step {c.step} of {self.run_steps}"
            f"{after}; checkpoint {where or 'none (no step was taken)'}; continue with resume=auto", got, c.step)

    def _step(self, batches) -> None:
        cfg, di, c = self.cfg, self.di, self.counters
        step = c.step
        set_lr(self.optimizer, warmup_cosine_lr(step, self.total_steps, self.warmup_steps, self.peak_lr,
                                                cfg.sched.min_lr))
        result = training_step.train_step(self.train_model, lambda model, batch, micro: self.task.loss(model, batch, step, micro),
                            self._micro_batches(batches), self.optimizer, self.params, accum_iter=cfg.accum_iter,
                            clip_grad=cfg.clip_grad, autocast_dtype=torch.bfloat16 if self.run.amp else None,
                            distributed=di.enabled)
        step_loss, problem = result.loss, result.problem
        if problem is not None:
            c.step += 1
            c.nonfinite_steps += 1
            c.nonfinite_in_a_row += 1
            self.losses.append(None)
            where = f"last good checkpoint: {self.last_checkpoint or self._on_disk() or 'none written yet'}"
            if c.nonfinite_in_a_row >= cfg.nonfinite.max_in_a_row:
                raise TrainingDiverged(
                    f"step {step}: {problem}; {c.nonfinite_in_a_row} non-finite steps in a row "
                    f"(nonfinite.max_in_a_row={cfg.nonfinite.max_in_a_row}), so the run stopped; {where}. Try a "
                    f"lower optim.blr, clip_grad=1.0 or amp=false, then resume=auto")
            self.logger.write(f"warning: step {step} skipped: {problem} ({c.nonfinite_in_a_row} in a row, "
                              f"{c.nonfinite_steps} in all)")
            return
        if not weights_finite(self.params):
            raise TrainingDiverged(
                f"step {step}: the weights are not finite after the optimizer step although the gradients were "
                f"(a fault inside the optimizer or one of its hooks); stopped before saving anything; last good "
                f"checkpoint: {self.last_checkpoint or self._on_disk() or 'none written yet'}")
        self.task.after_optimizer_step(step)
        c.step += 1
        c.nonfinite_in_a_row = 0
        c.window_loss += step_loss
        c.window_steps += 1
        self.losses.append(step_loss)

    def _micro_batches(self, batches):
        """The loader's next batches on the device, noting the damaged samples they stand in for."""
        while True:
            batch = to_model(next(batches), self.di.device, self.task.dataset)
            self.damaged_here.update(batch["index"][batch["skipped"] > 0].tolist())
            yield batch

    def _on_disk(self) -> Path | None:
        return find_latest(self.dir.checkpoints)

    def _damaged_total(self) -> list[int]:
        """Every rank: the damaged samples met by any rank over the whole run, each once (an
        epoch meets them again, and 17 damaged samples are 17, not 17 per epoch)."""
        mine = sorted(self.damaged_here)
        gathered = [mine]
        if self.di.enabled:
            gathered = [None] * self.di.world_size
            dist.all_gather_object(gathered, mine)
        return sorted(set(self.counters.damaged).union(*gathered))

    def _log(self) -> None:
        c = self.counters
        elapsed = time.perf_counter() - self.window_start
        steps_timed = c.step - self.window_start_step
        record = {"epoch": c.step / self.steps_per_epoch,
                  "loss": c.window_loss / c.window_steps if c.window_steps else math.nan,
                  "lr": max(g["lr"] for g in self.optimizer.param_groups),
                  "img_per_s": steps_timed * self.effective_batch / max(elapsed, 1e-9),
                  "skipped_files": len(self._damaged_total()), "nonfinite_steps": c.nonfinite_steps}
        self.logger.log(record, c.step)
        self.logger.progress(0, loss=record["loss"], lr=record["lr"], img_s=round(record["img_per_s"], 1))
        c.window_loss, c.window_steps = 0.0, 0
        self.window_start, self.window_start_step = time.perf_counter(), c.step

    def _save(self) -> None:
        """Every rank takes part (RNG states and counters are gathered); rank 0 writes."""
        di, c = self.di, self.counters
        damaged = self._damaged_total()
        rng = capture_rng_state()
        if di.enabled:  # every rank's RNG goes into rank 0's checkpoint
            gathered = [None] * di.world_size
            dist.all_gather_object(gathered, rng)
            rng = gathered
        else:
            rng = [rng]
        if di.is_main:
            engine = {**vars(c), "damaged": damaged}
            state = {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "step": c.step, "epoch": c.step // self.steps_per_epoch, "rng": rng,
                     "world_size": di.world_size, "config": self.config_yaml, "run_id": self.run_id,
                     "engine": engine, "data_identity": self.data_identity, **self.task.state_dict()}
            self.last_checkpoint = save_checkpoint(self.dir.checkpoints, c.step, state, self.config_yaml,
                                                   keep_last=self.cfg.checkpoint.keep_last, run_id=self.run_id)
        self.saved_step = c.step
        c.damaged = damaged
        self.damaged_here.clear()
        barrier()
