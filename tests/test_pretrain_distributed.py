"""`torchrun` with 2 CPU processes (gloo) matches 1 process with the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_mae.apps.pretrain import compose_config, run_pretrain
from sparse_mae.train.checkpoint import load_checkpoint
from tests.test_pretrain import debug_overrides, one_thread, read_metrics  # noqa: F401 (autouse fixture)


@pytest.mark.slow
def test_two_process_gloo_run_matches_one_process(tmp_path: Path):
    steps = 3
    one = run_pretrain(compose_config(debug_overrides(tmp_path / "one", max_steps=steps, batch_size=8)))

    out = tmp_path / "two"
    args = debug_overrides(out, max_steps=steps, batch_size=4)  # 4 per process x 2 = the same 8
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "sparse_mae.cli", "pretrain", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "cpu x 2" in proc.stderr  # really two processes, on CPU (gloo)

    two_state = load_checkpoint(out / "checkpoints" / f"step-{steps:08d}.pt")
    one_state = load_checkpoint(one.checkpoint)
    assert two_state["world_size"] == 2 and len(two_state["rng"]) == 2
    for key, value in one_state["model"].items():
        torch.testing.assert_close(two_state["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    one_losses = [r["loss"] for r in read_metrics(one.metrics)]
    two_losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert len(two_losses) == steps  # rank 0 alone writes the metrics
    torch.testing.assert_close(torch.tensor(two_losses), torch.tensor(one_losses), rtol=1e-5, atol=1e-6)
