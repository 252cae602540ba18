import pytest
import torch

import sparse_mae
from sparse_mae.flops import fcmae_gmacs, measured_gmacs


def test_fcmae_dense_gmacs_match_counter():
    with torch.device("meta"):
        model = sparse_mae.create_model("fcmae_convnextv2_atto")
    g = fcmae_gmacs(model, (224, 224))
    assert measured_gmacs(model, (224, 224)) == pytest.approx(g.total_dense, rel=1e-6)


def test_useful_gmacs_scale_with_visible_patches():
    g = fcmae_gmacs("atto", (224, 224), mask_ratio=0.6)
    assert g.encoder_useful == pytest.approx(g.encoder_dense * 19 / 49)
    mask = torch.ones(2, 49)
    mask[0, :10] = 0
    mask[1, :20] = 0
    g2 = fcmae_gmacs("atto", (224, 224), mask=mask)
    assert g2.encoder_useful == pytest.approx(g.encoder_dense * 15 / 49)
    assert g2.decoder == g.decoder
