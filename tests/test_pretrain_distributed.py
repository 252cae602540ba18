"""Distributed runs as users launch them, on CPU processes (gloo): `torchrun` with 2
processes, and two `torchrun` launchers acting as two nodes (c10d rendezvous on localhost)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_mae.apps.pretrain import compose_config, run_pretrain
from sparse_mae.train.checkpoint import load_checkpoint
from tests.test_pretrain import assert_states_equal, debug_overrides, one_thread, read_metrics  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
DDP_STRIDE_WARNING = "Grad strides do not match bucket view strides"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def torchrun_standalone(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "sparse_mae.cli", "pretrain", *args], cwd=cwd, env=env(), capture_output=True, text=True,
        timeout=timeout)


def two_node_launch(args: list[str], cwds: tuple[Path, Path], timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """Two launchers of one process each, meeting at a c10d rendezvous on localhost: what
    `torchrun --nnodes=2` on two machines does, the launcher with --node_rank=0 hosting it."""
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         f"--node_rank={node}", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
         "--rdzv_id=sparse-mae-test", "-m", "sparse_mae.cli", "pretrain", *args],
        cwd=cwd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for node, cwd in enumerate(cwds)]
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process_without_ddp_warnings(tmp_path: Path):
    steps = 3
    one = run_pretrain(compose_config(debug_overrides(tmp_path / "one", max_steps=steps, batch_size=8)))
    out = tmp_path / "two"
    proc = torchrun_standalone(debug_overrides(out, max_steps=steps, batch_size=4), tmp_path)  # 4 x 2 = the same 8
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "cpu x 2" in proc.stderr  # really two processes, on CPU (gloo)
    assert DDP_STRIDE_WARNING not in proc.stderr  # issue 11, item 13: the grads' layout fits DDP's buckets

    two_state = load_checkpoint(out / "checkpoints" / f"step-{steps:08d}.pt")
    one_state = load_checkpoint(one.checkpoint)
    assert two_state["world_size"] == 2 and len(two_state["rng"]) == 2
    for key, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    one_losses = [r["loss"] for r in read_metrics(one.metrics)]
    two_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(two_losses) == steps  # rank 0 alone writes the metrics
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_two_nodes_pretrain_checkpoint_and_resume_exactly_like_one_two_process_launcher(tmp_path: Path):
    extra = {"batch_size": 4, "model.drop_path_rate": 0.2, "checkpoint.keep_last": 0}
    single = torchrun_standalone(debug_overrides(tmp_path / "single", **extra), tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]

    nodes = tmp_path / "nodes"
    first = two_node_launch(debug_overrides(nodes, max_steps=3, **extra), (tmp_path, tmp_path))
    assert all(p.returncode == 0 for p in first), first[0].stderr[-3000:] + first[1].stderr[-3000:]
    second = two_node_launch(debug_overrides(nodes, resume="auto", **extra), (tmp_path, tmp_path))
    assert all(p.returncode == 0 for p in second), second[0].stderr[-3000:] + second[1].stderr[-3000:]
    assert "resumed from" in second[0].stderr + second[1].stderr

    for step in (4, 6, 8):
        assert_states_equal(load_checkpoint(tmp_path / "single" / "checkpoints" / f"step-{step:08d}.pt"),
                            load_checkpoint(nodes / "checkpoints" / f"step-{step:08d}.pt"))
    strip = [{k: v for k, v in r.items() if k not in ("time", "img_per_s")}
             for r in read_metrics(tmp_path / "single" / "metrics.jsonl")]
    assert strip == [{k: v for k, v in r.items() if k not in ("time", "img_per_s")}
                     for r in read_metrics(nodes / "metrics.jsonl")]


def torchrun_with_view(args: list[str], cwd: Path, view: str, timeout: int = 180) -> subprocess.CompletedProcess:
    """2 processes; rank 1 sees checkpoints/ as tests/fault_injection.py's VIEW says."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(REPO / "tests" / "fault_injection.py"), "pretrain", *args], cwd=cwd, env={**env(), "VIEW": f"1:{view}"},
        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_rank_0_decides_what_to_resume_for_every_rank(tmp_path: Path):
    """Issue 11, item 6: a rank whose view of the folder lags (here rank 1 does not yet see
    the newest checkpoint) must still resume the step rank 0 chose, or the ranks fork."""
    extra = {"batch_size": 4, "model.drop_path_rate": 0.2, "checkpoint.keep_last": 0}
    straight = torchrun_standalone(debug_overrides(tmp_path / "straight", **extra), tmp_path)
    assert straight.returncode == 0, straight.stderr[-4000:]
    first = torchrun_standalone(debug_overrides(tmp_path / "run", max_steps=4, **extra), tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = torchrun_with_view(debug_overrides(tmp_path / "run", resume="auto", **extra), tmp_path, "stale")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr and "step-00000004.pt" in resumed.stderr
    assert_states_equal(load_checkpoint(tmp_path / "straight" / "checkpoints" / "step-00000008.pt"),
                        load_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000008.pt"))


@pytest.mark.slow
def test_a_rank_that_cannot_load_the_chosen_checkpoint_stops_every_rank_clearly(tmp_path: Path):
    """Every rank checks that all loaded the same step; a node without the shared
    filesystem stops the run with a message, instead of training on from step 0."""
    first = torchrun_standalone(debug_overrides(tmp_path / "run", max_steps=2, batch_size=4), tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    second = torchrun_with_view(debug_overrides(tmp_path / "run", resume="auto", batch_size=4), tmp_path, "blind",
                                timeout=120)
    assert second.returncode != 0
    assert "could not all resume from" in second.stderr and "rank 1: FileNotFoundError" in second.stderr
    assert "shared filesystem" in second.stderr
    assert not (tmp_path / "run" / "checkpoints" / "step-00000004.pt").exists()  # nothing forked on
