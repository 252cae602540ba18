import pytest
import torch

import sparse_mae
from sparse_mae.data.builtin import builtin_batch
from sparse_mae.data.transforms import normalize
from sparse_mae.models.fcmae import FCMAE, masks_from_seeds
from sparse_mae.models.geometry import visible_count
from tests.equivalence import make_case


def test_shapes_any_multiple_of_32():
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    loss, pred, mask = model(torch.randn(2, 3, 96, 160), 0.6)
    assert pred.shape == (2, 15, 32 * 32 * 3) and mask.shape == (2, 15)
    assert loss.ndim == 0 and torch.isfinite(loss)


@pytest.mark.parametrize("ratio, L", [(0.6, 49), (0.75, 4), (0.99, 6), (0.01, 12)])
def test_random_mask_keeps_exact_count_and_is_reproducible(ratio, L):
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    m1 = model.random_masking(5, L, ratio, generator=torch.Generator().manual_seed(3))
    m2 = model.random_masking(5, L, ratio, generator=torch.Generator().manual_seed(3))
    m3 = model.random_masking(5, L, ratio, generator=torch.Generator().manual_seed(4))
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)
    kept = (m1 == 0).sum(1)
    assert visible_count(L, ratio) == max(1, int(L * (1 - ratio)))
    assert torch.all(kept == visible_count(L, ratio))
    assert not all(torch.equal(m1[0], m1[i]) for i in range(1, 5))  # drawn per sample


def test_patchify_roundtrip_and_order():
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    imgs = torch.randn(2, 3, 64, 96)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 6, 3072)
    # patch 1 is row 0, column 1; its first entries are pixel (0, 0) channels r, g, b
    torch.testing.assert_close(patches[0, 1, :3], imgs[0, :, 0, 32])
    torch.testing.assert_close(model.unpatchify(patches, (2, 3)), imgs)


def test_unmasked_reference_equals_dense_encoder():
    model, imgs, _ = make_case("debug", (64, 96), 2, 0.6)
    nothing_removed = torch.zeros(2, 6)
    latent = model.forward_encoder(imgs, nothing_removed)
    torch.testing.assert_close(latent, model.encoder.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_visible_output_ignores_masked_pixels():
    """Fails for a plain dense encoder (checked below), holds for the masked reference."""
    model, imgs, _ = make_case("debug", (96, 96), 2, 0.6)
    mask = torch.zeros(2, 9)
    mask[:, 4] = 1  # centre patch removed; its neighbours see it through the 7x7 convs
    changed = imgs.clone()
    changed[:, :, 32:64, 32:64] = torch.randn(2, 3, 32, 32) * 5
    with torch.no_grad():
        a = model.forward_encoder(imgs, mask)
        b = model.forward_encoder(changed, mask)
        visible = (mask == 0).reshape(2, 1, 3, 3).expand_as(a)
        torch.testing.assert_close(a[visible], b[visible], rtol=0, atol=0)
        assert torch.all(a[~visible] == 0)
        dense_a, dense_b = model.encoder.forward_features(imgs), model.encoder.forward_features(changed)
        assert not torch.allclose(dense_a[visible], dense_b[visible])


def test_loss_decreases_over_20_adamw_steps():
    torch.manual_seed(0)
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    imgs = normalize(builtin_batch(8, 64)[0])
    mask = model.random_masking(8, 4, 0.6, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    losses = []
    for _ in range(20):
        loss, _, _ = model(imgs, mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_only_on_removed_patches():
    model, imgs, mask = make_case("debug", (64, 64), 2, 0.5)
    with torch.no_grad():
        _, pred, _ = model(imgs, mask=mask)
        target = model.patchify(imgs)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        expected = ((pred - target) ** 2).mean(-1)[mask == 1].mean()
        loss, _, _ = model(imgs, mask=mask)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("backend", ["dense_masked", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_only_predicts_the_removed_patches_with_the_same_loss_and_gradients(backend, dtype):
    """Training's forward (loss_only) runs the pred layer on the removed patches only: the
    loss and every gradient equal the full forward's (to the dtype's rounding)."""
    model, imgs, mask = make_case("debug", (96, 64), 3, 0.6)
    model.set_backend(sparse_mae.get_backend(backend))
    results = []
    for loss_only in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss, pred, _ = model(imgs, mask=mask, loss_only=loss_only)
        loss.backward()
        results.append((loss.detach(), pred.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (full_loss, full_pred, full_grads), (loss, pred, grads) = results
    removed = int(mask.sum())
    assert full_pred.shape == (3, 6, 32 * 32 * 3) and pred.shape == (removed, 32 * 32 * 3)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(pred.float(), full_pred[mask.bool()].float(), **tol)
    torch.testing.assert_close(loss, full_loss, **tol)
    assert grads.keys() == full_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], **tol, msg=name)


@pytest.mark.parametrize("kwargs, imgs, mask, match", [
    ({}, torch.randn(2, 3, 64, 80), None, "multiple of 32"),
    ({}, torch.randn(2, 1, 64, 64), None, "3 input channels"),
    ({}, torch.randn(2, 3, 64, 64), torch.zeros(2, 5), r"mask must have shape \(N, L\) = \(2, 4\)"),
    ({}, torch.randn(2, 3, 64, 64), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1.0]]), r"keeps 0 patches in sample\(s\) \[1\]"),
])
def test_bad_input(kwargs, imgs, mask, match):
    model = sparse_mae.create_model("fcmae_convnextv2_debug", **kwargs)
    with pytest.raises(ValueError, match=match):
        model(imgs, mask=mask)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_bad_mask_ratio(ratio):
    """The ratio is a forward argument, checked once per call (the config checks a run's)."""
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        model(torch.randn(1, 3, 64, 64), ratio)
    with pytest.raises(ValueError, match=r"mask_ratio must be in \(0, 1\)"):
        masks_from_seeds(torch.arange(3), 4, ratio)


def test_forward_takes_a_mask_ratio_or_a_mask():
    model = sparse_mae.create_model("fcmae_convnextv2_debug")
    imgs = torch.randn(2, 3, 64, 64)
    for kwargs in ({}, {"mask_ratio": 0.5, "mask": torch.zeros(2, 4)}):
        with pytest.raises(ValueError, match="either mask_ratio .* or mask"):
            model(imgs, **kwargs)
    assert not hasattr(model, "mask_ratio")  # a forward argument, not a stored setting
    _, _, mask = model(imgs, mask_ratio=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.all((mask == 0).sum(1) == 2)


def test_the_model_takes_a_backend_object_not_a_name():
    with pytest.raises(TypeError, match="backend object"):
        FCMAE("native", depths=(1, 1, 1, 1), dims=(8, 8, 8, 8))
    model = sparse_mae.create_model("fcmae_convnextv2_debug", backend=sparse_mae.get_backend("native"))
    assert model.backend_name == "native"
    with pytest.raises(TypeError, match="backend object"):
        model.set_backend("dense_masked")
    with pytest.raises(ValueError, match="runs no encoder backend"):
        sparse_mae.create_model("convnextv2_debug", backend="native")


def test_unknown_backend_lists_valid():
    with pytest.raises(ValueError, match="valid backends: dense_masked"):
        sparse_mae.create_model("fcmae_convnextv2_debug", backend="sparse_magic")
