"""backend="minkowski" (MinkowskiEngine sparse convs) equals the dense_masked reference.

Tests that run ME skip cleanly when it is not installed (`bash tools/install_minkowski.sh`);
the install-hint and device-error tests run everywhere (ME simulated). The `gpu` tests run
ME on CUDA tensors; on a GPU machine `make setup` builds ME with CUDA for them.
"""
import os
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sparse_mae import create_model
from sparse_mae.backends import BackendUnavailableError, backend_availability, get_backend
from sparse_mae.backends.base import upsample_mask
from sparse_mae.flops import fcmae_gmacs
from sparse_mae.models.geometry import STAGE_UPSAMPLE
from tests.equivalence import assert_batch_independent, assert_same_as_reference, make_case, run_step

ME_OK, ME_WHY = backend_availability("minkowski")
pytestmark = pytest.mark.minkowski
needs_me = pytest.mark.skipif(not ME_OK, reason="MinkowskiEngine not importable; run bash tools/install_minkowski.sh")


# -- equivalence with the reference ------------------------------------------------------


@needs_me
@pytest.mark.parametrize("mask_ratio", [0.25, 0.6, 0.9])
def test_debug_equals_reference(mask_ratio):
    model, imgs, mask = make_case("debug", (96, 96), 3, mask_ratio)
    assert_same_as_reference(model, imgs, mask, "minkowski")


@needs_me
def test_debug_non_square_equals_reference():
    model, imgs, mask = make_case("debug", (160, 96), 3, 0.6, seed=1)
    assert_same_as_reference(model, imgs, mask, "minkowski")


@needs_me
@pytest.mark.slow
@pytest.mark.parametrize("mask_ratio", [0.25, 0.6, 0.9])
def test_atto_224_equals_reference(mask_ratio):
    model, imgs, mask = make_case("atto", (224, 224), 3, mask_ratio, seed=3)
    assert_same_as_reference(model, imgs, mask, "minkowski")


@needs_me
@pytest.mark.slow
def test_atto_non_square_equals_reference():
    model, imgs, mask = make_case("atto", (160, 96), 3, 0.6, seed=4)
    assert_same_as_reference(model, imgs, mask, "minkowski")


@needs_me
def test_drop_path_in_train_mode_equals_reference():
    model, imgs, mask = make_case("debug", (96, 64), 3, 0.5, seed=5, drop_path_rate=0.5)
    model.train()
    pred, _ = assert_same_as_reference(model, imgs, mask, "minkowski")
    # Drop path really acted (else this test would prove nothing): eval gives another pred.
    model.eval()
    with torch.no_grad():
        _, eval_pred, _ = model(imgs, mask=mask)
    assert not torch.allclose(pred, eval_pred)


@needs_me
def test_batch_independence_with_different_visible_counts():
    """Each sample's pred alone == in the batch; catches a batch-wide GRN norm."""
    model, imgs, _ = make_case("debug", (96, 96), 3, 0.5, seed=6)
    g = torch.Generator().manual_seed(6)
    mask = torch.ones(3, 9)
    for i, kept in enumerate((1, 4, 8)):
        mask[i, torch.randperm(9, generator=g)[:kept]] = 0.0
    assert_batch_independent(model, imgs, mask, "minkowski")


@needs_me
def test_last_patch_row_and_column_masked_everywhere_keeps_full_grid():
    model, imgs, _ = make_case("debug", (128, 96), 3, 0.25, seed=7)
    grid = torch.zeros(3, 4, 3)
    grid[:, -1, :] = 1.0  # last patch row removed in every sample
    grid[:, :, -1] = 1.0  # and the last column
    grid[1, 0, 0] = 1.0
    mask = grid.flatten(1)
    latent = get_backend("minkowski").encode(model.encoder, imgs, grid)
    assert latent.shape == (3, model.encoder.dims[-1], 4, 3)
    reference = get_backend("dense_masked").encode(model.encoder, imgs, grid)
    torch.testing.assert_close(latent, reference, rtol=1e-5, atol=1e-5)
    assert_same_as_reference(model, imgs, mask, "minkowski")


@needs_me
def test_visible_sites_with_zero_features_are_kept():
    """Coordinates come from the mask: a zero stem output (the official code would drop
    those sites as 'empty') still gives the reference's numbers."""
    model, imgs, mask = make_case("debug", (64, 96), 2, 0.5, seed=8)
    with torch.no_grad():
        model.encoder.stem[1].weight.zero_()
        model.encoder.stem[1].bias.zero_()
    assert_same_as_reference(model, imgs, mask, "minkowski")


# -- checkpoints ---------------------------------------------------------------------------


@needs_me
def test_checkpoint_round_trip_with_dense_masked(tmp_path):
    model, imgs, mask = make_case("debug", (64, 64), 2, 0.5, seed=9)
    model.set_backend(get_backend("minkowski"))
    _, _, grads = run_step(model, imgs, mask)
    with torch.no_grad():  # move the weights off their init so the check means something
        for name, p in model.named_parameters():
            p.sub_(0.1 * grads.get(name, torch.zeros_like(p)))
    model.eval()
    torch.save(model.state_dict(), tmp_path / "mink.pt")

    dense = create_model("fcmae_convnextv2_debug", backend="dense_masked").eval()
    dense.load_state_dict(torch.load(tmp_path / "mink.pt"), strict=True)
    with torch.no_grad():
        loss_mink, pred_mink, _ = model(imgs, mask=mask)
        loss_dense, pred_dense, _ = dense(imgs, mask=mask)
    torch.testing.assert_close(pred_dense, pred_mink, rtol=1e-5, atol=1e-5)

    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    back = create_model("fcmae_convnextv2_debug", backend="minkowski").eval()
    back.load_state_dict(torch.load(tmp_path / "dense.pt"), strict=True)
    with torch.no_grad():
        loss_back, _, _ = back(imgs, mask=mask)
    torch.testing.assert_close(loss_back, loss_dense, rtol=1e-5, atol=0)


@needs_me
def test_backend_owns_no_parameters():
    mink = create_model("fcmae_convnextv2_debug", backend="minkowski")
    dense = create_model("fcmae_convnextv2_debug", backend="dense_masked")
    assert list(mink.state_dict()) == list(dense.state_dict())


# -- layouts, cost, errors -----------------------------------------------------------------


def test_weight_layouts_invert_design_note():
    """Our dense->ME translations are the inverses of docs/design.md section 4's ME->dense ones."""
    from sparse_mae.backends.minkowski import depthwise_to_me, strided_to_me

    dw = torch.randn(5, 1, 7, 7)
    k = depthwise_to_me(dw)
    assert k.shape == (49, 5)
    torch.testing.assert_close(k.permute(1, 0).reshape(5, 1, 7, 7).transpose(3, 2), dw, rtol=0, atol=0)
    ds = torch.randn(6, 4, 2, 2)
    k = strided_to_me(ds)
    assert k.shape == (4, 4, 6)
    torch.testing.assert_close(k.permute(2, 1, 0).reshape(6, 4, 2, 2).transpose(3, 2), ds, rtol=0, atol=0)


def _expected_uncounted_macs(encoder, mask: torch.Tensor) -> int:
    """Depthwise pairs counted densely (visible sites x visible 7x7 neighbours) + one
    downsample pair per input site."""
    visible = 1.0 - mask.float()
    macs, sites_before = 0, None
    for i, factor in enumerate(STAGE_UPSAMPLE):
        keep = upsample_mask(visible, factor).unsqueeze(1)
        neighbours = F.conv2d(keep, torch.ones(1, 1, 7, 7), padding=3)
        macs += encoder.depths[i] * int((neighbours * keep).sum()) * encoder.dims[i]
        if i > 0:
            macs += sites_before * encoder.dims[i - 1] * encoder.dims[i]
        sites_before = int(keep.sum())
    return macs


@needs_me
def test_uncounted_macs_match_kernel_maps():
    model, imgs, mask = make_case("debug", (160, 96), 2, 0.6, seed=10)
    grid = mask.view(2, 5, 3)
    backend = get_backend("minkowski")
    assert backend.uncounted_macs(model.encoder, imgs, grid) == _expected_uncounted_macs(model.encoder, grid)
    # Counter (stem, linears) + uncounted (ME convs) ~ the useful sparse work, plus the
    # dense stem over removed patches; a bit less, since sites at the edge of the visible
    # region have < 49 neighbours.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backend.encode(model.encoder, imgs, grid)
    executed = counter.get_total_flops() / 2 + backend.uncounted_macs(model.encoder, imgs, grid)
    useful = fcmae_gmacs("debug", (160, 96), mask=mask).encoder_useful * 1e9 * 2  # 2 images
    dense_stem_on_removed = int(mask.sum()) * 64 * (3 * 16) * model.encoder.dims[0]
    assert 0.8 * useful <= executed - dense_stem_on_removed <= useful, (executed, useful)


@needs_me
def test_bad_mask_shape_raises():
    model, imgs, _ = make_case("debug", (64, 64), 1, 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        get_backend("minkowski").encode(model.encoder, imgs, torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="keeps 0 patches"):
        get_backend("minkowski").encode(model.encoder, imgs, torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="float32/float64 only"), torch.autocast("cpu", dtype=torch.bfloat16):
        get_backend("minkowski").encode(model.encoder, imgs, torch.zeros(1, 2, 2))


def test_missing_minkowski_gives_install_hint(monkeypatch):
    # `None` in sys.modules makes `import MinkowskiEngine` raise ImportError, as when not installed.
    monkeypatch.setitem(sys.modules, "MinkowskiEngine", None)
    from sparse_mae.backends.minkowski_compat import import_minkowski

    with pytest.raises(ImportError, match="install_minkowski.sh"):
        import_minkowski()
    ok, why = backend_availability("minkowski")
    assert not ok and "make setup" in why
    with pytest.raises(BackendUnavailableError, match="install_minkowski.sh"):
        get_backend("minkowski")
    with pytest.raises(BackendUnavailableError, match="backend 'minkowski' is not available"):
        create_model("fcmae_convnextv2_debug", backend="minkowski")
    # Everything else still works without it.
    create_model("fcmae_convnextv2_debug", backend="dense_masked")


# -- devices ---------------------------------------------------------------------------------


class _TensorClaimingCuda(torch.Tensor):
    """A CPU tensor that reports a CUDA device: enough for the backend's device check
    to take the CUDA path on a machine without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def _fake_minkowski(built_with_cuda: bool):
    return SimpleNamespace(is_cuda_available=lambda: built_with_cuda)


def test_cpu_only_minkowski_on_cuda_tensors_names_the_rebuild_command(monkeypatch):
    from sparse_mae.backends import minkowski as mink

    monkeypatch.setattr(mink, "import_minkowski", lambda: _fake_minkowski(False))
    model, imgs, _ = make_case("debug", (64, 64), 2, 0.5)
    cuda_imgs = imgs.as_subclass(_TensorClaimingCuda)
    assert cuda_imgs.device.type == "cuda"
    with pytest.raises(mink.MinkowskiNotBuiltForCudaError) as err:
        get_backend("minkowski").encode(model.encoder, cuda_imgs, torch.zeros(2, 2, 2))
    message = str(err.value)
    assert "built without CUDA" in message and "cuda:0" in message
    assert "SPARSE_MAE_TORCH=cuda bash tools/setup_env.sh" in message  # the rebuild command
    # The cost counter goes through the same check: no CPU fallback there either.
    with pytest.raises(mink.MinkowskiNotBuiltForCudaError):
        get_backend("minkowski").uncounted_macs(model.encoder, cuda_imgs, torch.zeros(2, 2, 2))


def test_cuda_built_minkowski_accepts_cuda_tensors_and_cpu_ones(monkeypatch):
    from sparse_mae.backends.minkowski import MinkowskiBackend

    imgs = torch.zeros(1, 3, 64, 64)
    mask = torch.zeros(1, 2, 2)
    MinkowskiBackend._check(_fake_minkowski(True), imgs.as_subclass(_TensorClaimingCuda), mask)
    MinkowskiBackend._check(_fake_minkowski(True), imgs, mask)
    MinkowskiBackend._check(_fake_minkowski(False), imgs, mask)  # CPU tensors need no CUDA build


def test_other_devices_are_a_clear_error():
    from sparse_mae.backends.minkowski import MinkowskiBackend

    with pytest.raises(ValueError, match="CPU or CUDA tensors, got meta"):
        MinkowskiBackend._check(_fake_minkowski(True), torch.zeros(1, 3, 64, 64, device="meta"), torch.zeros(1, 2, 2))


def test_built_with_cuda_probe_reads_the_build():
    from sparse_mae.backends.minkowski_compat import minkowski_built_with_cuda

    assert minkowski_built_with_cuda(_fake_minkowski(True)) is True
    assert minkowski_built_with_cuda(_fake_minkowski(False)) is False


def _cuda_minkowski_or_fail():
    """On a GPU machine the set-up builds ME with CUDA; a CPU-only ME there is a set-up
    fault, unless the CPU build was asked for."""
    from sparse_mae.backends.minkowski_compat import import_minkowski, minkowski_built_with_cuda

    if not minkowski_built_with_cuda(import_minkowski()):
        if os.environ.get("SPARSE_MAE_MINKOWSKI_BUILD") == "cpu":
            pytest.skip("MinkowskiEngine was built for CPU on request (SPARSE_MAE_MINKOWSKI_BUILD=cpu)")
        pytest.fail("MinkowskiEngine is CPU-only on a CUDA machine; run `SPARSE_MAE_TORCH=cuda bash tools/setup_env.sh`")


@pytest.fixture()
def exact_cuda_float32():
    """No TF32 in cuDNN/cuBLAS: the reference's dense convs and ME's kernels then agree to fp32 rounding."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_me
@pytest.mark.gpu
@pytest.mark.parametrize("mask_ratio", [0.25, 0.75])
def test_cuda_debug_equals_reference(exact_cuda_float32, mask_ratio):
    _cuda_minkowski_or_fail()
    model, imgs, mask = make_case("debug", (160, 96), 3, mask_ratio, seed=11)
    model, imgs, mask = model.cuda(), imgs.cuda(), mask.cuda()
    pred, ref_pred = assert_same_as_reference(model, imgs, mask, "minkowski")
    assert pred.device.type == "cuda" and ref_pred.device.type == "cuda"


@needs_me
@pytest.mark.gpu
def test_cuda_last_row_and_column_masked_keeps_full_grid_and_runs_on_the_gpu(exact_cuda_float32):
    _cuda_minkowski_or_fail()
    model, imgs, _ = make_case("debug", (128, 96), 2, 0.25, seed=12)
    encoder, imgs = model.encoder.cuda(), imgs.cuda()
    grid = torch.zeros(2, 4, 3, device="cuda")
    grid[:, -1, :] = 1.0
    grid[:, :, -1] = 1.0
    backend = get_backend("minkowski")
    latent = backend.encode(encoder, imgs, grid)
    assert latent.device.type == "cuda" and latent.shape == (2, encoder.dims[-1], 4, 3)
    torch.testing.assert_close(latent, get_backend("dense_masked").encode(encoder, imgs, grid), rtol=1e-5, atol=1e-5)
    # The cost count (ME kernel maps) does not depend on where the images are.
    assert backend.uncounted_macs(encoder, imgs, grid) == backend.uncounted_macs(encoder.cpu(), imgs.cpu(), grid.cpu())
