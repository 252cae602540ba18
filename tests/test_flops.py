import pytest
import torch

import sparse_mae
from sparse_mae.flops import fcmae_gmacs, measured_gmacs
from sparse_mae.models.geometry import visible_count


def test_fcmae_dense_gmacs_match_counter():
    """The training forward (loss_only: pred over the removed patches) counts what the model
    says; the full forward (every patch predicted, for pictures) adds pred on the visible ones."""
    model = sparse_mae.create_model("fcmae_convnextv2_atto")
    g = fcmae_gmacs(model, (224, 224), mask_ratio=0.6)
    assert measured_gmacs(model, (224, 224), mask_ratio=0.6, loss_only=True) == pytest.approx(g.total_dense, rel=1e-6)
    visible = visible_count(49, 0.6)
    pred_per_patch = 512 * 32 * 32 * 3 / 1e9
    assert measured_gmacs(model, (224, 224), mask_ratio=0.6) == pytest.approx(g.total_dense + visible * pred_per_patch, rel=1e-6)


def test_useful_gmacs_scale_with_visible_patches():
    g = fcmae_gmacs("atto", (224, 224), mask_ratio=0.6)
    assert g.encoder_useful == pytest.approx(g.encoder_dense * 19 / 49)
    mask = torch.ones(2, 49)
    mask[0, :10] = 0
    mask[1, :20] = 0
    g2 = fcmae_gmacs("atto", (224, 224), mask=mask)
    assert g2.encoder_useful == pytest.approx(g.encoder_dense * 15 / 49)
    # the pred layer runs on the removed patches: 39 and 29 (34 a sample) against 30
    pred_per_patch = 512 * 32 * 32 * 3 / 1e9
    assert g2.decoder == pytest.approx(g.decoder + (34 - 30) * pred_per_patch)
