"""Stops between steps: a stop signal during a long phase after a step (fine-tuning's
evaluation, the kNN monitor; the eval and probe tools' embedding) abandons it at the next
batch, instead of waiting for the whole split. The run checkpoints the step, exits 75, and
after resume=auto runs the abandoned phase at the same step and ends bit for bit like a run
never stopped. A failing evaluation costs no trained step either: the step is checkpointed
before the error is raised. Real signals to real processes (tests/fault_injection.py:
EVAL_DELAY slows each evaluation batch, EVAL_FAULT fails an evaluation).
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from sparse_mae.train.signals import EXIT_INTERRUPTED
from tests.test_fault_injection import finish, launch
from tests.test_finetune import ft_overrides
from tests.test_pretrain import debug_overrides
from tests.test_probe import probe_overrides
from tests.test_signals import assert_no_leftovers, assert_same_final_state, run_to_end

EVAL_DELAY = 0.5  # seconds per evaluation batch: 20 batches of 8 -> 10 s per evaluated model


def finetune_args(run_dir: Path) -> list[str]:
    # 4 steps per epoch, evaluation after each epoch (steps 4 and 8) on 160 val images, one
    # DataLoader worker (a scheduler signals it too); checkpoints only at the end, so the one
    # at step 4 is the stop's (or the failure's)
    return ft_overrides(run_dir, **{"data.num_train": 32, "data.num_val": 160, "batch_size": 8, "epochs": 2,
                                    "eval_every_epochs": 1, "data.num_workers": 1, "log_every_steps": 1,
                                    "checkpoint.every_steps": 100, "checkpoint.keep_last": 0})


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {path.name}: "
                                 f"{proc.stderr.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {path.name} after {timeout} s")


def signal_during_evaluation(app: str, args: list[str], cwd: Path, sig=signal.SIGTERM) -> tuple[int, str, float]:
    """Start `app` with slow evaluation batches, send `sig` to its process group once the first
    evaluation batch is read; -> (exit code, stderr, seconds from the signal to the exit)."""
    marker = cwd / f"evaluation-started-{app}"
    marker.unlink(missing_ok=True)
    proc = launch(app, args, None, 1, cwd, {"EVAL_DELAY": str(EVAL_DELAY), "EVAL_STARTED": str(marker)})
    wait_for_file(marker, proc)
    time.sleep(2 * EVAL_DELAY)  # well inside the evaluation
    sent = time.monotonic()
    os.killpg(proc.pid, sig)  # as SLURM and a terminal do: DataLoader workers too
    code, err = finish(proc, timeout=120)
    return code, err, time.monotonic() - sent


def pending_checkpoint(run_dir: Path) -> int:
    """-> the step of the run's only checkpoint, which must hold its hooks as pending."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert len(checkpoints) == 1, checkpoints
    state = load_checkpoint(checkpoints[0].path)
    assert state["engine"]["hooks_pending"] is True
    return checkpoints[0].step


@pytest.mark.slow
def test_signal_during_finetune_evaluation_stops_within_seconds_and_resume_ends_bit_exact(tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end("finetune", finetune_args(straight), tmp_path)
    code, err, seconds = signal_during_evaluation("finetune", [*finetune_args(stopped), "resume=auto"], tmp_path)
    print(f"signal to exit during evaluation: {seconds:.2f} s (the evaluation alone: >= {20 * EVAL_DELAY:.0f} s)")
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert seconds < 5, f"{seconds:.1f} s from the signal to the exit"  # the evaluation left takes 10 s or more
    assert "evaluation hooks abandoned on the stop signal" in err and "Traceback" not in err, err[-3000:]
    assert pending_checkpoint(stopped) == 4  # the step before the evaluation, written by the stop
    assert_no_leftovers(stopped)
    run_to_end("finetune", finetune_args(stopped), tmp_path)  # the step-4 evaluation runs first, then the rest
    assert_same_final_state(straight, stopped)  # evals and metrics included


@pytest.mark.slow
def test_failing_evaluation_keeps_the_trained_step_and_runs_again_after_resume(tmp_path):
    straight, failed = tmp_path / "straight", tmp_path / "failed"
    run_to_end("finetune", finetune_args(straight), tmp_path)
    proc = launch("finetune", [*finetune_args(failed), "resume=auto"], None, 1, tmp_path, {"EVAL_FAULT": "1"})
    code, err = finish(proc, timeout=240)
    assert code != 0 and "Input/output error" in err, err[-3000:]
    # the four steps before the evaluation were trained for nothing before: no checkpoint held them
    assert pending_checkpoint(failed) == 4
    assert "holds the step and runs them again after resume=auto" in err, err[-3000:]
    run_to_end("finetune", finetune_args(failed), tmp_path)
    assert_same_final_state(straight, failed)


@pytest.mark.slow
def test_signal_during_the_knn_monitor_stops_within_seconds_and_resume_ends_bit_exact(tmp_path):
    def args(run_dir: Path) -> list[str]:
        return debug_overrides(run_dir, **{"knn.enabled": "true", "knn.every_steps": 4, "knn.num_train": 160,
                                           "knn.num_val": 40, "knn.batch_size": 8, "checkpoint.every_steps": 100,
                                           "checkpoint.keep_last": 0})

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run_to_end("pretrain", args(straight), tmp_path)
    code, err, seconds = signal_during_evaluation("pretrain", [*args(stopped), "resume=auto"], tmp_path, signal.SIGUSR1)
    print(f"signal to exit during the kNN monitor: {seconds:.2f} s")
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert seconds < 5, f"{seconds:.1f} s from the signal to the exit"
    assert pending_checkpoint(stopped) == 4
    run_to_end("pretrain", args(stopped), tmp_path)
    assert_same_final_state(straight, stopped)


@pytest.mark.parametrize("app", ["probe", "eval"])
def test_signal_during_a_tools_embedding_ends_at_once_with_one_line(tmp_path, app):
    args = probe_overrides(**{"batch_size": 8, "data.num_workers": 1})
    if app == "eval":  # a classifier to evaluate: the fine-tuned debug model of two quick steps
        from sparse_mae.apps.finetune import compose_config, run_finetune

        result = run_finetune(compose_config(ft_overrides(tmp_path / "ft", max_steps=2, **{"data.num_val": 8})))
        args = [f"ckpt={result.checkpoint}", "device=cpu", "data.size=64", "data.draw_size=64", "data.num_val=160",
                "data.num_workers=1", "batch_size=8", f"out={tmp_path}"]
    code, err, seconds = signal_during_evaluation(app, args, tmp_path, signal.SIGINT)
    assert code == EXIT_INTERRUPTED, err[-3000:]
    assert seconds < 5, f"{seconds:.1f} s from the signal to the exit"
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"sparse-mae {app}: ") and "abandoned on SIGINT" in lines[-1], err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
