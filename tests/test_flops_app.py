"""`sparse-mae flops` reproduces the ConvNeXt V2 paper's params and GFLOPs (Table 1 / appendix)."""
import pytest

from sparse_mae.apps.flops import PAPER_VARIANTS, flops_rows, main

# paper: params (M), GFLOPs at 224 (the paper's GFLOPs are MACs)
PAPER = {
    "atto": (3.7, 0.55), "femto": (5.2, 0.78), "pico": (9.1, 1.37), "nano": (15.6, 2.45),
    "tiny": (28.6, 4.47), "base": (89.0, 15.4), "large": (198.0, 34.4), "huge": (660.0, 115.0),
}


def test_paper_params_and_gflops_at_224():
    rows = {r["variant"]: r for r in flops_rows(PAPER_VARIANTS, (224,), mask_ratio=0.6)}
    assert set(rows) == set(PAPER)
    for variant, (params_m, gflops) in PAPER.items():
        assert rows[variant]["params_m"] == pytest.approx(params_m, rel=0.01), variant
        assert rows[variant]["gflops"] == pytest.approx(gflops, rel=0.02), variant


def test_huge_at_512_and_sparse_columns():
    (row,) = flops_rows(["huge"], (512,), mask_ratio=0.6)
    assert row["gflops"] == pytest.approx(600.8, rel=0.02)  # the paper's 512px fine-tuning figure
    # 256 patches, int(256 * 0.4) = 102 visible
    assert row["encoder_sparse"] == pytest.approx(row["encoder_dense"] * 102 / 256)
    assert row["pretrain_sparse"] == pytest.approx(row["encoder_sparse"] + row["decoder"])
    assert row["pretrain_dense"] == pytest.approx(row["encoder_dense"] + row["decoder"])
    assert row["pretrain_params_m"] > row["params_m"] - 2.9  # + decoder, - the 1000-class head


def test_cli_prints_table(capsys):
    assert main(["--variants", "atto", "--size", "224", "256", "--mask-ratio", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "| atto | 224 | 3.7 | 0.55 | fcmae_convnextv2_atto |" in out and "| atto | 256 |" in out and "mask ratio 0.75" in out


@pytest.mark.parametrize("args, message", [
    (["--variants", "atom"], "unknown variant 'atom'"),
    (["--size", "100"], "multiples of 32"),
    (["--mask-ratio", "1.5"], "mask_ratio must be in (0, 1)"),
])
def test_bad_input_is_a_clear_error(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_resnet_rows_have_published_params_and_gflops_and_spark_columns():
    """torchvision's / timm's published ResNet figures at 224 (GFLOPs there are MACs too)."""
    rows = {r["variant"]: r for r in flops_rows(["resnet18", "resnet50"], (224,), mask_ratio=0.6)}
    assert rows["resnet18"]["params_m"] == pytest.approx(11.69, rel=0.001)
    assert rows["resnet18"]["gflops"] == pytest.approx(1.81, rel=0.01)
    assert rows["resnet50"]["params_m"] == pytest.approx(25.56, rel=0.001)
    assert rows["resnet50"]["gflops"] == pytest.approx(4.09, rel=0.01)
    row = rows["resnet50"]  # 49 patches, 19 visible at 0.6
    assert row["pretraining_model"] == "spark_resnet50"
    assert row["encoder_sparse"] == pytest.approx(row["encoder_dense"] * 19 / 49)
    assert row["pretrain_sparse"] == pytest.approx(row["encoder_sparse"] + row["decoder"])
