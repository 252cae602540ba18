"""Fault injection: a run killed with SIGKILL again and again (some kills inside a checkpoint
write), each time continued with `resume=auto`, ends bit for bit where an uninterrupted
run ends: weights, optimizer state, loop counters and metrics (less the wall-clock ones),
with no temp file left behind. For pretraining, fine-tuning and a 2-process gloo run.

Each run is a real process (tests/fault_injection.py wraps the CLI and kills itself at
the named moment); the random kills come from outside, at seeded random times.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_mae.io import TEMP_PREFIX
from sparse_mae.train.checkpoint import list_checkpoints, load_checkpoint
from sparse_mae.train.engine import TIMING_METRICS
from tests.test_pretrain import assert_states_equal, debug_overrides

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "fault_injection.py"
# Kills at named moments: inside checkpoint writes, at the rename, before rotation, mid-line.
FAULTS = ["save_half:2", "before_record:1", "before_rename:2", "after_rename:1", "metrics_line:3"]
RANDOM_KILLS = 3


def launch(app: str, args: list[str], fault: str | None, nproc: int, cwd: Path,
           extra_env: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(extra_env or {})}
    env.pop("FAULT", None)
    if fault:
        env["FAULT"] = fault
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc > 1 else [sys.executable])
    return subprocess.Popen([*launcher, str(DRIVER), app, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (torchrun starts its workers in sessions of their own,
    so a process group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo += children.get(pid, [])
    return tree


def finish(proc: subprocess.Popen, kill_after: float | None = None, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid):  # the launcher and every rank at once, as a lost machine
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = proc.communicate()
    return proc.returncode, err


def interrupted_run(app: str, args: list[str], run_dir: Path, nproc: int, seed: int) -> list[str]:
    """Run to completion through every fault and RANDOM_KILLS random kills; -> what happened."""
    rng = random.Random(seed)
    history = []
    plan = [(f, None) for f in FAULTS] + [(None, rng.uniform(1.0, 8.0)) for _ in range(RANDOM_KILLS)]
    for fault, kill_after in plan + [(None, None)] * 3:
        code, err = finish(launch(app, [*args, "resume=auto"], fault, nproc, run_dir.parent), kill_after)
        history.append(f"{fault or kill_after}: exit {code}")
        if (fault, kill_after) == (None, None):
            assert code == 0, "\n".join(history) + "\n" + err[-4000:]
            return history
        assert code in (0, -signal.SIGKILL) or nproc > 1, "\n".join(history) + "\n" + err[-4000:]
    raise AssertionError("unreachable")


def metrics_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_METRICS}
            for line in path.read_text().splitlines()]


def assert_same_end(straight: Path, interrupted: Path, history: list[str]) -> None:
    ours = {c.step for c in list_checkpoints(straight / "checkpoints")}
    theirs = {c.step for c in list_checkpoints(interrupted / "checkpoints")}
    assert ours == theirs, history
    last = max(ours)
    a = load_checkpoint(straight / "checkpoints" / f"step-{last:08d}.pt")
    b = load_checkpoint(interrupted / "checkpoints" / f"step-{last:08d}.pt")
    assert_states_equal(a, b)
    for key in ("ema",):
        for name, t in (a.get(key) or {}).items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    assert {k: v for k, v in a["engine"].items()} == {k: v for k, v in b["engine"].items()}, history
    assert a.get("evals") == b.get("evals")
    assert metrics_without_timing(straight / "metrics.jsonl") == metrics_without_timing(interrupted / "metrics.jsonl")
    leftovers = [p for p in interrupted.rglob("*") if p.name.startswith(TEMP_PREFIX)]
    assert not leftovers, leftovers
    orphans = [p for p in (interrupted / "checkpoints").iterdir()
               if p.suffix in (".json", ".yaml") and not p.with_suffix(".pt").exists()]
    assert not orphans, orphans


def straight_run(app: str, args: list[str], run_dir: Path, nproc: int) -> None:
    code, err = finish(launch(app, [*args, "resume=auto"], None, nproc, run_dir.parent))
    assert code == 0, err[-4000:]


PRETRAIN = {"epochs": 4, "checkpoint.keep_last": 2, "model.drop_path_rate": 0.2, "recon.every_steps": 4}


@pytest.mark.slow
def test_pretraining_killed_at_random_and_inside_checkpoint_writes_ends_bit_identical(tmp_path):
    straight_run("pretrain", debug_overrides(tmp_path / "straight", **PRETRAIN), tmp_path / "straight", 1)
    history = interrupted_run("pretrain", debug_overrides(tmp_path / "killed", **PRETRAIN), tmp_path / "killed", 1,
                              seed=11)
    assert sum("exit -9" in h for h in history) >= len(FAULTS), history  # the faults really killed it
    assert_same_end(tmp_path / "straight", tmp_path / "killed", history)


def finetune_overrides(out: Path) -> list[str]:
    from tests.test_finetune import ft_overrides

    return ft_overrides(out, epochs=4, batch_size=8, **{
        "data.num_train": 32, "data.num_val": 16, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2,
        "log_every_steps": 1, "eval_every_epochs": 1, "mixup.mixup_alpha": 0.8, "mixup.cutmix_alpha": 1.0,
        "model.drop_path_rate": 0.2})


@pytest.mark.slow
def test_finetuning_killed_at_random_and_inside_checkpoint_writes_ends_bit_identical(tmp_path):
    straight_run("finetune", finetune_overrides(tmp_path / "straight"), tmp_path / "straight", 1)
    history = interrupted_run("finetune", finetune_overrides(tmp_path / "killed"), tmp_path / "killed", 1, seed=12)
    assert sum("exit -9" in h for h in history) >= len(FAULTS), history
    assert_same_end(tmp_path / "straight", tmp_path / "killed", history)


@pytest.mark.slow
def test_two_process_gloo_run_killed_again_and_again_ends_bit_identical(tmp_path):
    args = {**PRETRAIN, "batch_size": 4}
    straight_run("pretrain", debug_overrides(tmp_path / "straight", **args), tmp_path / "straight", 2)
    history = interrupted_run("pretrain", debug_overrides(tmp_path / "killed", **args), tmp_path / "killed", 2,
                              seed=13)
    assert sum("exit 0" not in h for h in history) >= len(FAULTS), history
    assert_same_end(tmp_path / "straight", tmp_path / "killed", history)
