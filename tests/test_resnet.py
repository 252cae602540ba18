"""The dense ResNet: timm's parameter layout (manifests read off timm's resnet.py, kept as test
data), the paper's parameter counts, the geometry and clear errors for bad input."""
import json
import math
from pathlib import Path

import pytest
import torch

from sparse_mae.models.geometry import PATCH, STAGE_STRIDES
from sparse_mae.models.resnet import VARIANTS, BasicBlock, Bottleneck, build_resnet

MANIFEST_DIR = Path(__file__).parent / "data" / "resnet_layouts"
# torchvision's / timm's published parameter counts (ImageNet head)
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
          "resnet101": 44_549_160, "resnet152": 60_192_808}


@pytest.mark.parametrize("variant", ["resnet18", "resnet50"])
def test_state_dict_matches_timm_manifest(variant):
    reference = json.loads((MANIFEST_DIR / f"timm_{variant}.json").read_text())
    with torch.device("meta"):
        model = build_resnet(variant)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(ours) == list(reference)  # same keys in the same order (timm's state_dict order)
    assert ours == reference


@pytest.mark.parametrize("variant", list(PARAMS))
def test_parameter_counts_match_published(variant):
    with torch.device("meta"):
        model = build_resnet(variant)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[variant]


def test_bottleneck_stride_sits_on_the_3x3_conv_and_the_downsample():
    model = build_resnet("resnet50", num_classes=0)
    first = model.layer2[0]
    assert first.conv1.stride == (1, 1) and first.conv2.stride == (2, 2) and first.downsample[0].stride == (2, 2)
    assert model.layer1[0].downsample[0].stride == (1, 1)  # layer1 widens (64 -> 256) without striding
    assert model.layer2[1].downsample is None


def test_blocks_start_as_identity_branches():
    model = build_resnet("resnet_debug")
    for m in model.modules():
        if isinstance(m, (BasicBlock, Bottleneck)):
            assert torch.count_nonzero(m.branch()[-1][1].weight) == 0


@pytest.mark.parametrize("variant", ["resnet_debug", "resnet18"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160)])
def test_stage_shapes_follow_the_geometry(variant, size):
    model = build_resnet(variant, num_classes=5).eval()
    x = torch.randn(2, 3, *size)
    feats = model.forward_stages(x)
    assert STAGE_STRIDES == (4, 8, 16, 32) and PATCH == 32
    assert [tuple(f.shape) for f in feats] == [
        (2, c, size[0] // s, size[1] // s) for c, s in zip(model.stage_dims, STAGE_STRIDES)]
    assert model(x).shape == (2, 5)
    assert model.stage_dims == tuple(w * VARIANTS[variant].block.expansion for w in VARIANTS[variant].widths)


def test_bad_images_get_clear_errors():
    model = build_resnet("resnet_debug", num_classes=0)
    with pytest.raises(ValueError, match="multiple of 32"):
        model.forward_stages(torch.randn(1, 3, 70, 64))
    with pytest.raises(ValueError, match="in_chans=1"):
        model.forward_stages(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="valid: resnet_debug"):
        build_resnet("resnet51")


def test_flops_of_resnet50_match_the_paper():
    """4.1 GMACs at 224 (He et al. table 1: 3.8e9 FLOPs counts multiply-adds of the convs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_resnet("resnet50")
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    gmacs = counter.get_total_flops() / 2e9
    assert math.isclose(gmacs, 4.1, rel_tol=0.02), gmacs
