"""ResNet checkpoints: timm's layout (manifests kept as test data), SparK's own pretraining
layout, lossless round trips, the features of the dense export equal to the SparK encoder's,
the conversion check on every backend that runs ResNets, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_mae
from sparse_mae.backends import available_backends, get_backend
from sparse_mae.convert import (
    build_from_state_dict,
    conversion_check,
    encoder_part,
    expected_shapes,
    export_state_dict,
    import_state_dict,
    inspect_state_dict,
    read_state_dict,
    write_state_dict,
)
from sparse_mae.convert.layouts import Spec, canonical_shapes
from sparse_mae.models.geometry import PATCH

# timm's resnet* key -> shape (its state_dict order), written from timm's ResNet / Bottleneck /
# BasicBlock; real timm loads our exports in its own venv: tests/test_timm_loads_exports.py.
MANIFEST_DIR = Path(__file__).parent / "data" / "resnet_layouts"
MANIFEST_VARIANTS = ("resnet18", "resnet50", "resnet101")
RESNET_FORMATS = ("sparse_mae", "timm", "spark")


def resnet_backends() -> list[str]:
    """The available backends that run ResNet encoders (encode_stages)."""
    names = []
    for name in available_backends():
        try:
            get_backend(name).encode_stages(sparse_mae.create_model("resnet_debug", num_classes=0).eval(),
                                            torch.zeros(1, 3, PATCH, PATCH), torch.zeros(1, 1, 1))
        except NotImplementedError:
            continue
        names.append(name)
    return names


def random_spark_state(variant: str = "resnet_debug", seed: int = 0) -> dict[str, torch.Tensor]:
    """A SparK state dict with every tensor random, BN running statistics included (positive
    variances), so a rule that drops or swaps anything changes the numbers. Scaled so that
    every residual branch matters as much as its shortcut (He-scaled convs, BN gains ~1)."""
    torch.manual_seed(seed)
    model = sparse_mae.create_model(f"spark_{variant}")
    sd = model.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if k.endswith("running_var"):
                v.uniform_(0.5, 2.0)
            elif k.endswith("num_batches_tracked"):
                v.fill_(17)
            elif v.dim() == 4 and k.startswith("encoder."):
                v.normal_(0.0, (2.0 / v[0].numel()) ** 0.5)
            elif v.dim() == 1 and k.endswith(".weight"):
                v.uniform_(0.5, 1.5)
            else:
                v.normal_(0.0, 0.1)
    return sd


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


def read_manifest(variant: str) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v) for k, v in json.loads((MANIFEST_DIR / f"timm_{variant}.json").read_text()).items()}


# -- timm ----------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", MANIFEST_VARIANTS)
def test_timm_layout_is_timms_exactly(variant):
    reference = read_manifest(variant)
    ours = expected_shapes(Spec(variant, "classifier", 1000), "timm")
    assert list(ours) == list(reference)  # keys, and timm's order
    assert ours == reference


@pytest.mark.parametrize("variant", [pytest.param(v, marks=[pytest.mark.slow] if v == "resnet101" else [])
                                     for v in MANIFEST_VARIANTS])
def test_spark_export_to_timm_is_the_manifest_and_imports_back(variant):
    """The export path itself, from a SparK checkpoint of zeros: encoder + fresh 1000-class fc
    is timm's resnet* strictly; the import detects the variant."""
    ours = {k: torch.zeros(s) for k, s in canonical_shapes(Spec(variant, "spark")).items()}
    exported, spec = export_state_dict(ours, "timm", head=True, num_classes=1000)
    assert {k: tuple(v.shape) for k, v in exported.items()} == read_manifest(variant)
    _, back_spec = import_state_dict(exported, "timm")
    assert back_spec == Spec(variant, "classifier", 1000) == spec


# -- round trips and features --------------------------------------------------------------

@pytest.mark.parametrize("fmt", RESNET_FORMATS)
def test_round_trip_is_lossless(fmt, tmp_path):
    sd = random_spark_state()
    exported, spec = export_state_dict(sd, fmt)
    path = write_state_dict(exported, tmp_path / f"x.{fmt}.pt", {"variant": spec.variant})
    back, back_spec = import_state_dict(read_state_dict(path)[0], fmt)
    if fmt == "spark":  # it holds the whole pretraining model
        assert back_spec == Spec("resnet_debug", "spark")
        assert_same_tensors(back, sd)
    else:
        assert back_spec == Spec("resnet_debug", "classifier", 0)
        assert_same_tensors(back, encoder_part(sd, inspect_state_dict(sd, "sparse_mae"))[0])


@pytest.mark.parametrize("variant", ["resnet_debug", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_timm_export_has_the_spark_encoders_features_at_mask_0(variant):
    """The dense ResNet rebuilt from the timm export (export -> import) gives the SparK
    encoder's features, every stage, to 1e-5 relative, on each backend at mask 0 (eval mode:
    the running statistics, which the export must carry)."""
    sd = random_spark_state(variant)
    exported, spec = export_state_dict(sd, "timm", head=True, num_classes=7)
    dense = build_from_state_dict(*import_state_dict(exported, "timm"))
    spark = build_from_state_dict(sd, inspect_state_dict(sd, "sparse_mae")).eval()
    imgs = torch.randn(2, 3, 2 * PATCH, 3 * PATCH)
    with torch.no_grad():
        want = dense.forward_stages(imgs)
        for backend in resnet_backends():
            got = get_backend(backend).encode_stages(spark.encoder, imgs, torch.zeros(2, 2, 3))
            for stage, (g, w) in enumerate(zip(got, want)):
                assert float((g - w).abs().max()) <= 1e-5 * float(w.abs().max()), (backend, stage)
        assert dense(imgs).shape == (2, 7)


def test_conversion_check_on_resnets_runs_every_resnet_backend():
    sd = random_spark_state()
    exported, spec = export_state_dict(sd, "spark")
    report = conversion_check(sd, inspect_state_dict(sd, "sparse_mae"), exported, "spark", spec)
    assert set(report) == set(resnet_backends())
    assert report["dense_masked"]["max_abs"] == 0.0
    for backend, r in report.items():
        assert r["relative"] < 1e-4, (backend, r)


def test_conversion_check_catches_a_swapped_tensor():
    sd = random_spark_state()
    exported, spec = export_state_dict(sd, "timm")
    exported["layer2.0.conv2.weight"] = exported["layer2.0.conv2.weight"].flip(-1).contiguous()
    report = conversion_check(sd, inspect_state_dict(sd, "sparse_mae"), exported, "timm", spec,
                              backends=["dense_masked"])
    assert report["dense_masked"]["relative"] > 1e-3


# -- SparK's own layout --------------------------------------------------------------------

def test_spark_layout_names_parts_as_spark_does():
    sd = random_spark_state()
    exported, _ = export_state_dict(sd, "spark", input_size=64)
    assert torch.equal(exported["sparse_encoder.sp_cnn.conv1.weight"], sd["encoder.conv1.weight"])
    assert torch.equal(exported["sparse_encoder.sp_cnn.layer1.0.downsample.1.running_var"],
                       sd["encoder.layer1.0.downsample.1.running_var"])
    assert torch.equal(exported["dense_decoder.dec.0.up_sample.weight"], sd["decoder.dec.0.up_sample.weight"])
    assert torch.equal(exported["dense_decoder.proj.bias"], sd["decoder.proj.bias"])
    for key in ("densify_norms.0.running_mean", "densify_projs.3.weight", "mask_tokens.2"):
        assert torch.equal(exported[key], sd[key])
    # the buffers SparK registers and never reads, so that its strict load accepts the file
    assert exported["norm_black"].shape == (1, 3, 64, 64) and exported["imn_m"].shape == (1, 3, 1, 1)
    assert not any(k.startswith(("encoder.", "decoder.")) for k in exported)


def test_a_checkpoint_saved_as_spark_saves_it_imports(tmp_path):
    """SparK's *_withdecoder_1kpretrained_spark_style.pth: the model's state dict with its
    config beside the tensors, under 'module', with the optimizer and run facts."""
    sd = random_spark_state()
    spark_sd, _ = export_state_dict(sd, "spark")
    spark_sd["config"] = {"mask_ratio": 0.6, "sparse_encoder.input_size": 224, "dense_decoder.width": 512}
    torch.save({"args": "Namespace(...)", "input_size": 224, "arch": "resnet_debug", "epoch": 3,
                "performance_desc": "0.5 0.5", "module": spark_sd, "optimizer": {"state": {}, "param_groups": []},
                "is_pretrain": True}, tmp_path / "spark_style.pth")
    foreign, meta = read_state_dict(tmp_path / "spark_style.pth")
    assert meta["spark_config"]["mask_ratio"] == 0.6 and meta["epoch"] == 3
    back, spec = import_state_dict(foreign, "spark")
    assert spec == Spec("resnet_debug", "spark")
    assert_same_tensors(back, sd)


def test_auto_format_reads_spark_and_timm_files(tmp_path):
    from sparse_mae.convert.starting_weights import read_weights

    sd = random_spark_state()
    for fmt in ("spark", "timm"):
        exported, _ = export_state_dict(sd, fmt)
        path = write_state_dict(exported, tmp_path / f"{fmt}.pt", {})
        _, spec, read_as = read_weights(str(path), "auto", "resnet_debug")
        assert spec.variant == "resnet_debug"
        assert read_as == ("spark" if fmt == "spark" else "sparse_mae")  # ours is timm's layout


@pytest.mark.parametrize("fmt", ["official_dense", "official_fcmae"])
def test_convnext_only_formats_refuse_a_resnet(fmt):
    with pytest.raises(ValueError, match="ResNet exports as timm, spark or sparse_mae"):
        export_state_dict(random_spark_state(), fmt)


def test_spark_format_refuses_a_classifier_and_a_convnext():
    clf = sparse_mae.create_model("resnet_debug", num_classes=3).state_dict()
    with pytest.raises(ValueError, match="needs a SparK checkpoint"):
        export_state_dict(clf, "spark")
    fcmae = sparse_mae.create_model("fcmae_convnextv2_debug").state_dict()
    with pytest.raises(ValueError, match="SparK's ResNet layout"):
        export_state_dict(fcmae, "spark")


def test_wrong_resnet_variant_names_the_one_it_looks_like():
    sd = random_spark_state()
    exported, _ = export_state_dict(sd, "timm")
    with pytest.raises(ValueError, match="look like variant 'resnet_debug'"):
        import_state_dict(exported, "timm", variant="resnet18")


# -- CLI ------------------------------------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sparse_mae.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_export_spark_then_import_gives_identical_tensors(tmp_path):
    sd = random_spark_state()
    torch.save({"model": sd, "step": 5, "config": "model:\n  variant: resnet_debug\n"}, tmp_path / "pre.pt")
    r = _cli("export", "ckpt=pre.pt", "format=spark", "out=spark.pth", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for backend in resnet_backends():
        assert f"conversion check vs {backend}" in r.stdout
    assert "module" in torch.load(tmp_path / "spark.pth", weights_only=True)  # where SparK's code reads it
    r = _cli("import", "ckpt=spark.pth", "format=spark", "out=ours.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ours["metadata"]["variant"] == "resnet_debug" and ours["metadata"]["kind"] == "spark"
    assert_same_tensors(ours["model"], sd)


def test_cli_export_timm_with_head(tmp_path):
    torch.save({"model": random_spark_state()}, tmp_path / "pre.pt")
    r = _cli("export", "ckpt=pre.pt", "format=timm", "out=t.safetensors", "head=true", "num_classes=10",
             "check_backends=[dense_masked]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    sd, meta = read_state_dict(tmp_path / "t.safetensors")
    assert sd["fc.weight"].shape == (10, 64) and meta["variant"] == "resnet_debug"
