"""`sparse-mae pretrain model=resnet*`: SparK on the existing engine (checkpoints, exact resume,
the kNN monitor, the reconstruction picture, backend switches) and its config checks. Runs are
in-process with resnet_debug at 64px, as tests/test_pretrain.py runs FCMAE."""
from __future__ import annotations

import math

import pytest
import torch

from sparse_mae.apps.pretrain import compose_config, run_pretrain
from sparse_mae.errors import ConfigError
from sparse_mae.models.spark import SparK
from sparse_mae.train.checkpoint import load_checkpoint
from tests.test_pretrain import assert_states_equal, debug_overrides, one_thread  # noqa: F401 (fixture)


def run(out, **extra):
    extra = {"model": "resnet_debug", "model.decoder_dim": 64, "backend": "native", **extra}
    return run_pretrain(compose_config(debug_overrides(out, **extra)))


def test_spark_run_checkpoints_resumes_bit_exactly_and_monitors(tmp_path):
    knn = {"knn.enabled": "true", "knn.num_train": 16, "knn.num_val": 8, "knn.every_steps": 4, "recon.every_steps": 4}
    straight = run(tmp_path / "straight", **knn)
    assert straight.steps == 8 and all(math.isfinite(x) for x in straight.losses)
    state = load_checkpoint(straight.checkpoint)
    assert "encoder.layer4.0.bn3.running_var" in state["model"] and "mask_tokens.3" in state["model"]
    assert straight.reconstruction.is_file()
    records = [r for r in straight.metrics.read_text().splitlines() if "knn/top1" in r]
    assert len(records) == 2  # steps 4 and 8
    first_half = run(tmp_path / "split", max_steps=3, **knn)
    second_half = run(tmp_path / "split", resume="auto", **knn)
    assert straight.losses[3:] == second_half.losses and first_half.steps == 3
    assert_states_equal(load_checkpoint(straight.checkpoint), load_checkpoint(second_half.checkpoint))


def test_a_dense_masked_checkpoint_resumes_on_native(tmp_path):
    run(tmp_path, backend="dense_masked", max_steps=1)
    resumed = run(tmp_path, resume="auto", max_steps=2)
    assert resumed.steps == 2 and math.isfinite(resumed.losses[0])


def test_the_experiment_preset_is_sparks_recipe():
    cfg = compose_config(["experiment=spark_resnet50"])
    assert cfg.model.variant == "resnet50" and cfg.model.decoder_dim == 512 and cfg.mask_ratio == 0.6
    assert cfg.epochs == 1600 and cfg.sched.warmup_epochs == 40 and cfg.optim.blr == 2e-4
    assert cfg.batch_size * 8 * cfg.accum_iter == 4096 and cfg.optim.weight_decay == 0.04


def test_model_resnet_builds_spark(tmp_path):
    from sparse_mae.apps.pretrain import PretrainTask
    from sparse_mae.train.distributed import DistInfo

    task = PretrainTask(compose_config(debug_overrides(tmp_path, model="resnet18")), DistInfo())
    assert isinstance(task.model, SparK) and task.model.backend_name == "dense_masked"
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in task.model.modules())  # one process


@pytest.mark.parametrize("override, message", [
    ("model.decoder_depth=2", "fixed five UNet blocks"),
    ("model.drop_path_rate=0.1", "no stochastic depth"),
    ("model.decoder_dim=48", "multiple of 32"),
    ("init=some.pt", "init= reads ConvNeXt V2 checkpoints only"),
])
def test_settings_spark_lacks_are_clear_errors(override, message, tmp_path):
    overrides = debug_overrides(tmp_path, model="resnet_debug", backend="dense_masked") + [override]
    with pytest.raises(ConfigError, match=message):
        run_pretrain(compose_config(overrides))


def test_two_processes_with_sync_bn_normalise_over_the_global_batch(tmp_path):
    """torchrun, 2 CPU processes (gloo) of batch 4 against one process of batch 8: with
    model.sync_bn every BatchNorm (encoder, densify, decoder) sees the global batch, so the
    first loss and every running statistic agree (without it each process normalises its own
    half: running variances 0.4 apart, measured). The weights are not compared: Adam turns the
    rounding of near-zero gradients into lr-sized steps either way."""
    from tests.test_pretrain import read_metrics
    from tests.test_pretrain_distributed import torchrun_standalone

    steps = 2
    one = run(tmp_path / "one", max_steps=steps, batch_size=8)
    out = tmp_path / "two"
    extra = {"model": "resnet_debug", "model.decoder_dim": 64, "backend": "native"}
    proc = torchrun_standalone(debug_overrides(out, max_steps=steps, batch_size=4, **extra), tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "cpu x 2" in proc.stderr
    two_state = load_checkpoint(out / "checkpoints" / f"step-{steps:08d}.pt")["model"]
    one_state = load_checkpoint(one.checkpoint)["model"]
    buffers = [k for k in one_state if ".running_" in k]
    assert len(buffers) > 20
    for key in buffers:
        torch.testing.assert_close(two_state[key], one_state[key], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    first = [read_metrics(path)[0]["loss"] for path in (out / "metrics.jsonl", one.metrics)]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
