"""backend="minkowski" on ResNets (`MinkowskiBackend.encode_stages`, SparK's encoder on ME's
sparse tensors): the independent reference (tests/spark_reference.py) and dense_masked in
features, every gradient (weights, BatchNorm, image) and running statistics, in training and
eval mode; a whole SparK step in float64 and float32; the edges of the grid; the run.

ME has no bf16/fp16 kernels, so there is no bf16 tolerance to hold it to: under autocast it
stops with an error naming the fix (tested here), as on ConvNeXt (tests/test_minkowski.py).
Tests that run ME skip cleanly where it is not installed.
"""
import copy
import json

import pytest
import torch
import torch.nn as nn

import sparse_mae
from sparse_mae.backends import backend_availability, get_backend
from sparse_mae.models.geometry import PATCH, STAGE_STRIDES
from tests.spark_reference import reference_stages
from tests.test_pretrain import cli
from tests.test_resnet_backends import (
    assert_close_rel,
    backend_fn,
    encoder_with_random_norms,
    random_mask,
    reference_fn,
    run,
)
from tests.test_spark import ReferenceBackend, case, step

ME_OK, ME_WHY = backend_availability("minkowski")
pytestmark = [pytest.mark.minkowski,
              pytest.mark.skipif(not ME_OK, reason="MinkowskiEngine not importable; run bash tools/install_minkowski.sh")]

# (variant, dtype, rtol). resnet50 in float64: at its depth float32 rounding alone moves the
# reference's own gradients 1-5% (conv1's 1%) from its float64 ones (measured), so float32
# cannot tell a wrong term from noise there; float64 does (to 1e-7: `run` sums the loss in
# float32, which leaves ~1e-9 of the largest gradient).
CASES = [
    pytest.param("resnet_debug", torch.float32, 1e-4, id="resnet_debug-fp32"),
    pytest.param("resnet18", torch.float32, 1e-4, id="resnet18-fp32", marks=pytest.mark.slow),
    pytest.param("resnet50", torch.float64, 1e-7, id="resnet50-fp64", marks=pytest.mark.slow),
]


def removed_sites(mask: torch.Tensor, stage: int) -> torch.Tensor:
    f = PATCH // STAGE_STRIDES[stage]
    return (mask == 1).repeat_interleave(f, 1).repeat_interleave(f, 2)


def assert_runs_equal(got, ref, what: str, mask: torch.Tensor, rtol: float = 1e-4):
    """Two `run`s (features, parameter grads, image grad, buffers) equal within rtol of each
    tensor's largest value (float32 rounding by default)."""
    for i, (f, r) in enumerate(zip(got[0], ref[0])):
        assert f.shape == r.shape, f"{what}: stage {i} shape {tuple(f.shape)} != {tuple(r.shape)}"
        assert_close_rel(f, r, rtol, f"{what}: stage {i} features")
        assert torch.count_nonzero(f.permute(1, 0, 2, 3)[:, removed_sites(mask, i)]) == 0, \
            f"{what}: stage {i} features must be exactly 0 where removed"
    assert got[1].keys() == ref[1].keys()
    for k in ref[1]:
        assert_close_rel(got[1][k], ref[1][k], rtol, f"{what}: grad {k}")
    assert_close_rel(got[2], ref[2], rtol, f"{what}: image grad")
    for k in ref[3]:
        assert torch.allclose(got[3][k].double(), ref[3][k].double(), rtol=rtol, atol=rtol / 10), f"{what}: buffer {k}"


def loss_weights(enc, batch: int, size: tuple[int, int], dtype=torch.float32) -> list[torch.Tensor]:
    shapes = [(batch, c, size[0] // s, size[1] // s) for c, s in zip(enc.stage_dims, STAGE_STRIDES)]
    return [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("variant, dtype, rtol", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_encoder_equals_reference_and_dense_masked(variant, dtype, rtol, training):
    """96x160 (3 x 5 patches, odd on both axes): every stage's grid is odd somewhere, so a
    wrong kernel-offset order, an off-centre odd kernel or a misplaced strided output shows."""
    size = (96, 160)
    enc = encoder_with_random_norms(variant).train(training).to(dtype)
    imgs = torch.randn(3, 3, *size).to(dtype)
    mask = random_mask(3, size[0] // PATCH, size[1] // PATCH, 0.6, seed=1)
    weights = loss_weights(enc, 3, size, dtype)
    ref = run(reference_fn(training), copy.deepcopy(enc), imgs, mask, weights)
    dense = run(backend_fn("dense_masked"), copy.deepcopy(enc), imgs, mask, weights)
    got = run(backend_fn("minkowski"), copy.deepcopy(enc), imgs, mask, weights)
    assert_runs_equal(got, ref, "minkowski vs reference", mask, rtol)
    assert_runs_equal(got, dense, "minkowski vs dense_masked", mask, rtol)


def test_hidden_last_row_and_column_keep_every_grid_whole():
    """The bottom patch row and right patch column hidden in every sample: ME's coordinates
    then end short of the image, yet every stage keeps its full (H/s, W/s) grid; a sample
    with a single visible patch (in a corner) included."""
    size = (96, 128)
    enc = encoder_with_random_norms("resnet_debug")
    mask = torch.ones(2, 3, 4)
    mask[0, :2, :3] = 0.0
    mask[1, 0, 0] = 0.0
    imgs = torch.randn(2, 3, *size)
    weights = loss_weights(enc, 2, size)
    ref = run(reference_fn(True), copy.deepcopy(enc), imgs, mask, weights)
    got = run(backend_fn("minkowski"), copy.deepcopy(enc), imgs, mask, weights)
    assert_runs_equal(got, ref, "minkowski vs reference", mask)


@pytest.mark.parametrize("variant", ["resnet_debug", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_spark_step_equals_the_reference_step_in_float64_and_float32(variant):
    """A whole SparK step (encoder, densify, decoder, loss): float64 to rounding, float32 within
    tests/test_spark.py's 2% of the float64 step per gradient."""
    model, imgs, mask = case(variant)
    ref_loss, ref_grads = step(model, ReferenceBackend(), imgs, mask, torch.float64)
    loss, grads = step(model, get_backend("minkowski"), imgs, mask, torch.float64)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for name, ref in ref_grads.items():
        torch.testing.assert_close(grads[name], ref, rtol=1e-7, atol=1e-7 * float(ref.abs().max()),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    loss, grads = step(model, get_backend("minkowski"), imgs, mask, torch.float32)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, ref in ref_grads.items():
        error = float((grads[name] - ref).norm() / ref.norm().clamp_min(1e-30))
        assert error <= 0.02, f"float32 grad of {name}: relative norm {error:.3g} from float64"


def test_bf16_autocast_is_refused_naming_the_fix():
    model, imgs, mask = case("resnet_debug")
    model.set_backend(get_backend("minkowski"))
    with pytest.raises(ValueError, match="float32/float64 only.*amp=false.*backend='native'"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        model(imgs, mask=mask, loss_only=True)


def test_sync_batch_norm_encoder_runs():
    """SyncBatchNorm goes through the same row BatchNorm; without a process group it is a
    BatchNorm over the visible sites: the reference's numbers and running statistics."""
    enc = nn.SyncBatchNorm.convert_sync_batchnorm(encoder_with_random_norms("resnet_debug"))
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 2, 2, 0.5, seed=3)
    ref_enc, got_enc = copy.deepcopy(enc), copy.deepcopy(enc)
    ref = reference_stages(dict(ref_enc.named_parameters()), dict(ref_enc.named_buffers()), imgs, mask)
    got = get_backend("minkowski").encode_stages(got_enc, imgs, mask)
    for f, r in zip(got, ref):
        assert_close_rel(f.detach(), r.detach(), 1e-5, "features")
    for (k, a), (_, b) in zip(got_enc.named_buffers(), ref_enc.named_buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6), f"buffer {k}"


def test_a_sample_with_no_visible_patch_is_a_clear_error():
    enc = encoder_with_random_norms("resnet_debug")
    mask = torch.tensor([[[0.0, 1.0], [1.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    with pytest.raises(ValueError, match=r"keeps 0 patches in sample\(s\) \[1\]"):
        get_backend("minkowski").encode_stages(enc, torch.randn(2, 3, 64, 64), mask)


@pytest.mark.slow
def test_pretrain_resnet18_on_minkowski_runs(tmp_path):
    """`sparse-mae pretrain model=resnet18 backend=minkowski`: two steps, finite losses, a
    checkpoint (~1 min on 2 shared cores, most of it start-up)."""
    proc = cli(["model=resnet18", "backend=minkowski", "device=cpu", "logger=none", "logger.progress=false",
                "data.size=64", "data.draw_size=64", "data.num_images=16", "data.num_workers=0", "batch_size=8",
                "max_steps=2", "sched.warmup_steps=1", "recon.every_steps=0", "log_every_steps=1",
                f"output_dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spark_resnet18, backend minkowski" in proc.stdout + proc.stderr
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "run" / "checkpoints" / "step-00000002.pt").is_file()
