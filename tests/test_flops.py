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


# -- ResNets (SparK) -------------------------------------------------------------------------

def test_resnet_conv_costs_match_a_hand_count():
    """One layer by hand: per 32x32 patch, conv1 (7x7/2, 3->64) has 16x16 output sites, and
    resnet50's layer2.0.conv2 (3x3/2, 128->128, input at /4) has 4x4 at /8."""
    from sparse_mae.flops import conv_macs_per_patch

    model = sparse_mae.create_model("resnet50", num_classes=0)
    assert conv_macs_per_patch(model.conv1, 1) == (16 * 16 * 7 * 7 * 3 * 64, 2)
    assert conv_macs_per_patch(model.layer2[0].conv2, 4) == (4 * 4 * 3 * 3 * 128 * 128, 8)
    assert conv_macs_per_patch(model.layer2[0].downsample[0], 4) == (4 * 4 * 256 * 512, 8)


@pytest.mark.parametrize("variant", ["resnet_debug", "resnet18", "resnet50"])
@pytest.mark.parametrize("size", [(224, 224), (96, 160)])
def test_resnet_classifier_gmacs_match_counter(variant, size):
    from sparse_mae.flops import resnet_classifier_gmacs

    with torch.device("meta"):
        model = sparse_mae.create_model(variant, num_classes=10)
    assert measured_gmacs(model, size) == pytest.approx(resnet_classifier_gmacs(model, size), rel=1e-9)


def executed_gmacs(model, size, mask_ratio=None, mask=None) -> float:
    """FlopCounterMode's count plus what the backend runs outside torch ops (the compiled gather
    conv), as the bench adds them: per image, GMACs."""
    from sparse_mae.models.fcmae import random_mask

    patches = (size[0] // 32) * (size[1] // 32)
    if mask is None:
        mask = random_mask(1, patches, mask_ratio, generator=torch.Generator().manual_seed(0))
    counted = measured_gmacs(model, size, mask=mask)
    return counted + model.uncounted_macs(torch.zeros(1, 3, *size), mask) / 1e9


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_spark_gmacs_match_counter_dense_and_visible_only(kernels, monkeypatch):
    """On dense_masked the encoder does its dense work at any mask (so at mask 0 too), on the
    native engine the visible patches' only, with its compiled gather convs or as torch ops;
    the decoder is the same dense work on both."""
    from sparse_mae.flops import spark_gmacs

    monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", kernels)
    for backend, useful in (("dense_masked", False), ("native", True)):
        model = sparse_mae.create_model("spark_resnet_debug", backend=backend)
        for ratio in (0.4, 0.75):
            g = spark_gmacs(model, (128, 128), mask_ratio=ratio)
            expected = g.total_useful if useful else g.total_dense
            assert executed_gmacs(model, (128, 128), mask_ratio=ratio) == pytest.approx(expected, rel=1e-9)
        mask = torch.zeros(1, 16)  # mask 0: every patch visible, dense == useful
        g0 = spark_gmacs(model, (128, 128), mask=mask)
        assert g0.encoder_useful == g0.encoder_dense
        assert executed_gmacs(model, (128, 128), mask=mask) == pytest.approx(g0.total_dense, rel=1e-9)
    g = spark_gmacs(model, (224, 224), mask_ratio=0.6)
    assert g.encoder_useful == pytest.approx(g.encoder_dense * 19 / 49)
