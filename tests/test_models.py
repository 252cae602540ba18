import pytest
import torch

import sparse_mae
from sparse_mae.flops import classifier_gmacs, count_params, measured_gmacs

# (params M, GMACs at 224) from the paper's table (docs/design.md section 2)
TABLE = {
    "atto": (3.7, 0.55), "femto": (5.2, 0.78), "pico": (9.1, 1.37), "nano": (15.6, 2.45),
    "tiny": (28.6, 4.47), "base": (89.0, 15.4), "large": (198.0, 34.4), "huge": (660.0, 115.0),
}


@pytest.mark.parametrize("variant", list(TABLE))
def test_params_and_gmacs_match_paper(variant):
    with torch.device("meta"):
        model = sparse_mae.create_model(f"convnextv2_{variant}")
    params_m = count_params(model) / 1e6
    ref_params, ref_gmacs = TABLE[variant]
    assert abs(params_m - ref_params) / ref_params < 0.01, params_m
    measured = measured_gmacs(model, (224, 224))
    assert measured == pytest.approx(classifier_gmacs(variant), rel=1e-9)  # analytic == counted
    if variant not in ("large", "huge"):
        assert abs(measured - ref_gmacs) / ref_gmacs < 0.02, measured


def test_huge_at_512_matches_paper():
    assert classifier_gmacs("huge", (512, 512)) == pytest.approx(600.8, rel=0.02)


def test_list_models_and_names():
    names = sparse_mae.list_models()
    assert "convnextv2_atto" in names and "fcmae_convnextv2_huge" in names and "convnextv2_debug" in names
    with pytest.raises(ValueError, match="valid models: .*convnextv2_atto"):
        sparse_mae.create_model("convnextv2_tinyy")


def test_classifier_forward_and_layout():
    model = sparse_mae.create_model("convnextv2_debug", num_classes=7)
    out = model(torch.randn(2, 3, 64, 96))
    assert out.shape == (2, 7)
    sd = model.state_dict()
    assert sd["stages.1.blocks.0.mlp.fc1.weight"].shape == (64, 16)
    assert sd["stages.1.blocks.0.mlp.grn.weight"].shape == (64,)
    assert sd["stages.1.downsample.1.weight"].shape == (16, 8, 2, 2)
    assert sd["stages.0.blocks.0.conv_dw.weight"].shape == (8, 1, 7, 7)
    assert "head.fc.weight" in sd and "stages.0.downsample.0.weight" not in sd


def test_init_std_is_002():
    torch.manual_seed(0)
    model = sparse_mae.create_model("convnextv2_atto")
    w = model.stages[2].blocks[0].mlp.fc1.weight
    assert 0.015 < w.std().item() < 0.025  # not timm's default std=1.0 (official FCMAE fault)
    assert torch.all(model.stages[2].blocks[0].mlp.grn.weight == 0)


def test_drop_path_is_per_sample_and_off_in_eval():
    torch.manual_seed(0)
    model = sparse_mae.create_model("convnextv2_debug", drop_path_rate=0.5, num_classes=0)
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    a, b = model(x), model(x)
    torch.testing.assert_close(a, b)
    model.train()
    outs = torch.stack([model(x) for _ in range(4)])
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("bad, match", [
    (torch.randn(1, 3, 70, 64), "multiple of 32"),
    (torch.randn(1, 4, 64, 64), "3 input channels"),
    (torch.randn(3, 64, 64), r"shape \(N, 3, H, W\)"),
])
def test_classifier_bad_input(bad, match):
    model = sparse_mae.create_model("convnextv2_debug")
    with pytest.raises(ValueError, match=match):
        model(bad)


@pytest.mark.parametrize("name,label", [("fcmae_convnextv2_debug", "FCMAE"), ("spark_resnet_debug", "SparK")])
def test_pretraining_forward_takes_a_mask_ratio_or_a_mask_not_both(name, label):
    model = sparse_mae.create_model(name, backend="dense_masked")
    imgs = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 1.0]])
    for kwargs in ({}, {"mask_ratio": 0.5, "mask": mask}):
        with pytest.raises(ValueError, match=rf"give {label}\.forward either mask_ratio .* or mask"):
            model(imgs, **kwargs)
    loss, _, used = model(imgs, mask=mask)
    assert torch.equal(used, mask) and torch.isfinite(loss)
    assert model(imgs, mask_ratio=0.5)[2].sum(1).tolist() == [2.0, 2.0]
