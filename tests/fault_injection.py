"""`python tests/fault_injection.py <app> [overrides]`: run `sparse-mae <app>` and SIGKILL this
process at a chosen moment, as a power cut or the OOM killer would. For tests only.

FAULT=<moment>:<n> picks the n-th time (counted in this process, rank 0 only) that the
run reaches <moment>:
  save_half      half of a checkpoint's bytes are written to its temp file
  before_record  the checkpoint's temp file is complete; its record is not written yet
  before_rename  the record is in place; the checkpoint is not renamed into place yet
  after_rename   the checkpoint is in place; old ones are not rotated out yet
  metrics_line   half of a metrics.jsonl line is written
No FAULT: the run goes on undisturbed (the test may still kill it from outside).

STEP_DELAY=<seconds> makes every optimizer step that much longer (a sleep before it), so a
test's signal lands mid-run on a model that is otherwise too quick.

EVAL_DELAY=<seconds> makes every batch of an evaluation (fine-tuning's, the kNN monitor's,
eval's and probe's embedding) that much longer, so a signal lands mid-evaluation; the first
such batch creates the file EVAL_STARTED names, if set. EVAL_FAULT=<n> makes the n-th
evaluation of this process fail at its first batch with an I/O error, as a val split on a
failing network filesystem does.

START_DELAY=<seconds> makes the run wait that long before its first step, once it is set up
(its stop-signal handlers installed, its start line written), after printing "waiting
before the first step": a test's signal then lands before any step was taken.

VIEW=<rank>:<view> gives one rank another view of the run directory's checkpoints/, as a
node of a multi-node job may have:
  stale   listings lack the newest step-*.pt (a network filesystem client that has not
          seen the last write yet)
  blind   the folder looks empty and its files do not exist (a node without the shared
          filesystem)
"""
from __future__ import annotations

import io
import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(moment: str, nth: int) -> None:
    import torch

    import sparse_mae.train.checkpoint as checkpoint
    import sparse_mae.train.metrics as metrics

    seen = {"n": 0}

    def reached() -> bool:
        seen["n"] += 1
        return seen["n"] == nth

    if moment == "save_half":
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if not hasattr(f, "write") or not reached():
                return real_save(obj, f, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            die()

        checkpoint.torch.save = save
    elif moment == "before_record":
        real_sha = checkpoint.sha256_of

        def sha256_of(path):
            if reached():
                die()
            return real_sha(path)

        checkpoint.sha256_of = sha256_of
    elif moment in ("before_rename", "after_rename"):
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            is_checkpoint = str(dst).endswith(".pt")
            if is_checkpoint and moment == "before_rename" and reached():
                die()
            real_replace(src, dst, *args, **kwargs)
            if is_checkpoint and moment == "after_rename" and reached():
                die()

        checkpoint.os.replace = replace
    elif moment == "metrics_line":
        real_log = metrics.RunLogger.log

        def log(self, record, step):
            if self.enabled and reached():
                import json

                line = json.dumps(metrics._jsonable({"step": step, **record})) + "\n"
                self._file.write(line[: len(line) // 2])
                self._file.flush()
                die()
            return real_log(self, record, step)

        metrics.RunLogger.log = log
    else:
        raise SystemExit(f"unknown FAULT moment {moment!r}")


def install_view(view: str) -> None:
    import pathlib

    real_iterdir, real_stat = pathlib.Path.iterdir, os.stat

    def is_checkpoint(p) -> bool:
        p = pathlib.Path(p)
        return p.parent.name == "checkpoints" and p.name.startswith("step-")

    def iterdir(self):
        found = list(real_iterdir(self))
        if self.name != "checkpoints":
            return iter(found)
        if view == "blind":
            return iter([p for p in found if not is_checkpoint(p)])
        newest = max((p.name for p in found if p.suffix == ".pt"), default=None)
        return iter([p for p in found if p.stem != pathlib.Path(newest or "").stem])

    def stat(path, *args, **kwargs):
        if view == "blind" and is_checkpoint(os.fspath(path) if not isinstance(path, int) else ""):
            raise FileNotFoundError(2, "No such file or directory", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    pathlib.Path.iterdir = iterdir
    os.stat = stat


def slow_down_steps(seconds: float) -> None:
    import time

    import torch

    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        time.sleep(seconds)
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step


def slow_down_or_fail_evaluations(delay: float, fail_nth: int | None, started_marker: str | None) -> None:
    import time

    import sparse_mae.probe.features as features
    import sparse_mae.train.evaluation as evaluation

    seen = {"evaluations": 0}
    for module in (evaluation, features):
        real_to_model = module.to_model

        def to_model(batch, *args, _real=real_to_model, **kwargs):
            if started_marker and not os.path.exists(started_marker):
                open(started_marker, "w").close()
            time.sleep(delay)
            return _real(batch, *args, **kwargs)

        module.to_model = to_model
    if fail_nth is not None:
        real_evaluate = evaluation.evaluate_classifier

        def evaluate_classifier(*args, **kwargs):
            seen["evaluations"] += 1
            if seen["evaluations"] == fail_nth:
                raise OSError(5, "Input/output error", "val/some-image.jpg")
            return real_evaluate(*args, **kwargs)

        evaluation.evaluate_classifier = evaluate_classifier
        import sparse_mae.apps.finetune as finetune  # it imported the name

        finetune.evaluate_classifier = evaluate_classifier


def delay_the_start(seconds: float) -> None:
    import time

    from sparse_mae.train import engine

    real_loop = engine._Engine._loop

    def loop(self):
        print("fault_injection: waiting before the first step", flush=True)
        time.sleep(seconds)
        return real_loop(self)

    engine._Engine._loop = loop


def main() -> int:
    if os.environ.get("EVAL_DELAY") or os.environ.get("EVAL_FAULT"):
        slow_down_or_fail_evaluations(float(os.environ.get("EVAL_DELAY") or 0),
                                      int(os.environ["EVAL_FAULT"]) if os.environ.get("EVAL_FAULT") else None,
                                      os.environ.get("EVAL_STARTED"))
    if os.environ.get("STEP_DELAY"):
        slow_down_steps(float(os.environ["STEP_DELAY"]))
    if os.environ.get("START_DELAY"):
        delay_the_start(float(os.environ["START_DELAY"]))
    view = os.environ.get("VIEW")
    if view:
        rank, kind = view.split(":")
        if int(os.environ.get("RANK", "0")) == int(rank):
            install_view(kind)
    fault = os.environ.get("FAULT")
    if fault and int(os.environ.get("RANK", "0")) == 0:
        moment, nth = fault.rsplit(":", 1)
        install(moment, int(nth))
    from sparse_mae.cli import main as cli_main

    sys.argv = [sys.argv[0], *sys.argv[1:]]
    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
