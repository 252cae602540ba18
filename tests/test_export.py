"""Checkpoint conversion: reference manifests, lossless round trips, conversion check,
ONNX, and clear errors for wrong-variant / truncated / extra-key checkpoints."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparse_mae
from sparse_mae.backends import available_backends
from sparse_mae.convert import (
    FORMATS,
    CheckpointMismatchError,
    Spec,
    conversion_check,
    expected_shapes,
    export_state_dict,
    import_state_dict,
    inspect_state_dict,
    read_state_dict,
    write_state_dict,
)
from sparse_mae.convert.layouts import RESNET_ONLY_FORMATS, TRANSFORMS

CONVNEXT_FORMATS = [f for f in FORMATS if f not in RESNET_ONLY_FORMATS]  # ResNet's: test_export_resnet.py

# Layout manifests (key -> shape) read off the official code and timm, kept as test data
# (docs/design.md section 5). Listed by name, not globbed, so a missing file fails its test.
MANIFEST_DIR = Path(__file__).parent / "data" / "layouts"
PAPER_VARIANTS = ("atto", "femto", "pico", "nano", "tiny", "base", "large", "huge")
MANIFESTS = [MANIFEST_DIR / f"{fmt}_convnextv2_{v}.json"
             for fmt, variants in (("official_fcmae", ("atto", "tiny")), ("official_dense", PAPER_VARIANTS),
                                   ("timm", PAPER_VARIANTS))
             for v in variants]


def random_fcmae_state(variant: str = "debug", seed: int = 0) -> dict[str, torch.Tensor]:
    """An FCMAE state dict with every tensor random (GRN and biases too), so a transform that
    drops or permutes anything changes the numbers."""
    torch.manual_seed(seed)
    model = sparse_mae.create_model(f"fcmae_convnextv2_{variant}")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.state_dict()


def encoder_of(sd: dict) -> dict:
    return {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# -- manifests ---------------------------------------------------------------------------

def _manifest_spec(path: Path) -> tuple[str, Spec]:
    name = path.stem  # e.g. official_fcmae_convnextv2_atto
    fmt, variant = name.rsplit("_convnextv2_", 1)
    return fmt, Spec(variant, "fcmae") if fmt == "official_fcmae" else Spec(variant, "classifier", 1000)


def _read_manifest(path: Path) -> dict[str, tuple[int, ...]]:
    assert path.is_file(), f"layout manifest {path} is missing: it is test data kept in the repository"
    return {k: tuple(v) for k, v in json.loads(path.read_text()).items()}


def test_manifest_folder_holds_exactly_the_listed_manifests():
    """A manifest added to the folder but not to MANIFESTS would never be tested."""
    assert sorted(p.name for p in MANIFEST_DIR.glob("*.json")) == sorted(p.name for p in MANIFESTS)


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_layout_matches_reference_manifest(manifest):
    fmt, spec = _manifest_spec(manifest)
    reference = _read_manifest(manifest)
    ours = expected_shapes(spec, fmt)
    assert sorted(set(reference) - set(ours)) == [] and sorted(set(ours) - set(reference)) == []
    assert {k: s for k, s in ours.items() if reference[k] != s} == {}


BIG = ("base", "large", "huge")  # GBs of zeros: slow on 2 cores


@pytest.mark.parametrize("manifest", [pytest.param(m, marks=[pytest.mark.slow] if m.stem.rsplit("_", 1)[1] in BIG
                                                   else []) for m in MANIFESTS], ids=lambda p: p.stem)
def test_export_of_zero_weights_matches_manifest_and_detects_variant(manifest):
    """The export path itself (not just the layout table) produces exactly the manifest; built
    from zero tensors so even `huge` is quick; then the import detects the variant."""
    fmt, spec = _manifest_spec(manifest)
    reference = _read_manifest(manifest)
    fcmae = Spec(spec.variant, "fcmae")
    from sparse_mae.convert.layouts import canonical_shapes

    ours = {k: torch.zeros(s) for k, s in canonical_shapes(fcmae).items()}
    exported, _ = export_state_dict(ours, fmt, head=fmt != "official_fcmae", num_classes=1000)
    assert {k: tuple(v.shape) for k, v in exported.items()} == reference
    back, back_spec = import_state_dict(exported, fmt)
    assert back_spec == spec


@pytest.mark.parametrize("variant", ["atto", "tiny"])  # 1x1-conv MLPs and Linear ones
def test_timm_encoder_layout_keeps_timms_head_norm(variant):
    """timm's convnextv2_* built with num_classes=0 keeps `head.norm` (only `head.fc` goes), so
    its strict load of an encoder-only export wants those keys: the 1000-class manifest
    without `head.fc.*`."""
    reference = _read_manifest(MANIFEST_DIR / f"timm_convnextv2_{variant}.json")
    without_classifier = {k: s for k, s in reference.items() if not k.startswith("head.fc.")}
    assert expected_shapes(Spec(variant, "classifier", 0), "timm") == without_classifier


def test_timm_encoder_export_writes_a_fresh_head_norm_and_import_drops_it():
    sd = random_fcmae_state()
    exported, spec = export_state_dict(sd, "timm")
    assert spec.num_classes == 0
    assert torch.equal(exported["head.norm.weight"], torch.ones(32))  # LayerNorm's initial values
    assert torch.equal(exported["head.norm.bias"], torch.zeros(32))
    back, _ = import_state_dict(exported, "timm")
    assert_same_tensors(back, encoder_of(sd))
    older = {k: v for k, v in exported.items() if not k.startswith("head.norm.")}  # our exports before
    assert_same_tensors(import_state_dict(older, "timm")[0], encoder_of(sd))


def test_auto_format_reads_a_timm_encoder_export(tmp_path):
    """debug builds Linear MLPs, so only the head norm without a classifier tells timm's
    encoder layout from ours (which has no head.norm without head.fc)."""
    from sparse_mae.convert.starting_weights import read_weights

    sd = random_fcmae_state()
    exported, _ = export_state_dict(sd, "timm")
    path = write_state_dict(exported, tmp_path / "timm.safetensors", {})
    back, spec, read_as = read_weights(str(path), "auto", "debug")
    assert read_as == "timm" and spec == Spec("debug", "classifier", 0)
    assert_same_tensors(back, encoder_of(sd))


# -- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", CONVNEXT_FORMATS)
def test_round_trip_is_lossless(fmt, tmp_path):
    sd = random_fcmae_state()
    exported, spec = export_state_dict(sd, fmt)
    path = write_state_dict(exported, tmp_path / f"x.{fmt}.safetensors", {"variant": spec.variant})
    loaded, meta = read_state_dict(path)
    assert meta["variant"] == "debug"
    back, back_spec = import_state_dict(loaded, fmt)
    assert_same_tensors(back, sd if fmt == "official_fcmae" else encoder_of(sd))


@pytest.mark.parametrize("fmt", ["sparse_mae", "timm", "official_dense"])
def test_classifier_with_head_round_trip(fmt, tmp_path):
    torch.manual_seed(1)
    clf = sparse_mae.create_model("convnextv2_debug", num_classes=5)
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_()
    sd = clf.state_dict()
    exported, spec = export_state_dict(sd, fmt)
    assert spec.num_classes == 5
    path = write_state_dict(exported, tmp_path / "x.pt", {})
    back, _ = import_state_dict(read_state_dict(path)[0], fmt)
    assert_same_tensors(back, sd)


def test_transforms_are_inverse_pairs():
    shapes = {"same": (3, 5), "grn4d": (7,), "row": (7,), "conv1x1": (6, 4), "me_dw": (5, 1, 7, 7),
              "me_down": (6, 4, 2, 2)}
    for name, (fwd, bwd) in TRANSFORMS.items():
        t = torch.randn(shapes[name])
        assert torch.equal(bwd(fwd(t)), t), name


def test_me_kernel_layout_agrees_with_a_direct_scatter():
    """ME kernel offset k = (dy, dx) with x fastest after the transpose (docs/design.md section 4):
    check the (49, C) layout entry by entry, independently of the reshape formula."""
    w = torch.randn(3, 1, 7, 7)
    k = TRANSFORMS["me_dw"][0](w)
    for c in range(3):
        for dy in range(7):
            for dx in range(7):
                assert k[dx * 7 + dy, c] == w[c, 0, dy, dx]
    w2 = torch.randn(5, 4, 2, 2)
    k2 = TRANSFORMS["me_down"][0](w2)
    for dy in range(2):
        for dx in range(2):
            assert torch.equal(k2[dx * 2 + dy], w2[:, :, dy, dx].t())


def test_official_fcmae_kernels_match_the_minkowski_backend_conversion():
    mink = pytest.importorskip("sparse_mae.backends.minkowski")
    sd = random_fcmae_state()
    exported, _ = export_state_dict(sd, "official_fcmae")
    assert torch.equal(exported["encoder.stages.1.0.dwconv.kernel"],
                       mink.depthwise_to_me(sd["encoder.stages.1.blocks.0.conv_dw.weight"]))
    assert torch.equal(exported["encoder.downsample_layers.2.1.kernel"],
                       mink.strided_to_me(sd["encoder.stages.2.downsample.1.weight"]))


# -- conversion check across backends ----------------------------------------------------

@pytest.mark.parametrize("fmt", CONVNEXT_FORMATS)
def test_conversion_check_dense_equals_sparse_at_visible_sites(fmt):
    sd = random_fcmae_state()
    exported, spec = export_state_dict(sd, fmt)
    report = conversion_check(sd, inspect_state_dict(sd, "sparse_mae"), exported, fmt, spec)
    assert set(report) == set(available_backends())
    for backend, r in report.items():
        assert r["relative"] < 1e-4, (backend, r)
    assert report["dense_masked"]["max_abs"] == 0.0


def test_conversion_check_catches_a_wrong_transform(monkeypatch):
    """The check must fail if a transform is wrong (here: the ME kernel not transposed back)."""
    import sparse_mae.convert.layouts as layouts

    sd = random_fcmae_state()
    exported, spec = export_state_dict(sd, "official_fcmae")
    fwd, _ = layouts.TRANSFORMS["me_dw"]
    monkeypatch.setitem(layouts.TRANSFORMS, "me_dw",
                        (fwd, lambda k: k.permute(1, 0).reshape(k.shape[1], 1, 7, 7)))
    layouts.layout.cache_clear()
    try:
        report = conversion_check(sd, inspect_state_dict(sd, "sparse_mae"), exported, "official_fcmae", spec,
                                  backends=["dense_masked"])
    finally:
        layouts.layout.cache_clear()
    assert report["dense_masked"]["relative"] > 1e-2


@pytest.mark.parametrize("backend", available_backends())
def test_checkpoint_pretrained_with_each_backend_exports_identically(backend):
    """A few FCMAE steps with each backend from the same start; the backends compute the same
    function, so the trained weights, and hence the exports, agree to float tolerance."""
    from sparse_mae.data.builtin import builtin_batch

    exports = {}
    for name in ("dense_masked", backend):
        torch.manual_seed(0)
        model = sparse_mae.create_model("fcmae_convnextv2_debug", backend=name)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        imgs, _ = builtin_batch(4, size=64, seed=0)
        for step in range(3):
            loss, _, _ = model(imgs, 0.6, generator=torch.Generator().manual_seed(step))
            opt.zero_grad()
            loss.backward()
            opt.step()
        exports[name], _ = export_state_dict(model.state_dict(), "official_fcmae")
    a, b = exports["dense_masked"], exports[backend]
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


# -- ONNX --------------------------------------------------------------------------------

def test_onnx_export_logits_match(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from omegaconf import OmegaConf

    from sparse_mae.apps.app import compose
    from sparse_mae.apps.export import run_export

    torch.manual_seed(0)
    clf = sparse_mae.create_model("convnextv2_debug", num_classes=8).eval()
    with torch.no_grad():
        for p in clf.parameters():
            p.normal_(0, 0.1)
    torch.save({"model": clf.state_dict()}, tmp_path / "clf.pt")
    cfg = compose("export", [f"ckpt={tmp_path / 'clf.pt'}", "format=onnx",
                                        f"out={tmp_path / 'clf.onnx'}", "onnx.image_size=64", "check=false"])
    assert OmegaConf.select(cfg, "format") == "onnx"
    run_export(cfg)
    session = ort.InferenceSession(str(tmp_path / "clf.onnx"))
    for batch in (1, 3):  # dynamic batch
        x = torch.randn(batch, 3, 64, 64)
        got = session.run(None, {"images": x.numpy()})[0]
        with torch.no_grad():
            want = clf(x).numpy()
        assert got.shape == want.shape
        assert abs(got - want).max() < 1e-4


# -- errors ------------------------------------------------------------------------------

def test_wrong_variant_names_the_variant_it_looks_like():
    exported, _ = export_state_dict(random_fcmae_state(), "official_fcmae")
    with pytest.raises(CheckpointMismatchError) as err:
        import_state_dict(exported, "official_fcmae", variant="atto")
    msg = str(err.value)
    assert "wrong shapes" in msg and "look like variant 'debug'" in msg
    assert "encoder.stages.0.0.dwconv.kernel: got (49, 8), expected (49, 40)" in msg


def test_extra_keys_are_listed_and_strict_false_ignores_them():
    exported, _ = export_state_dict(random_fcmae_state(), "timm")
    exported["head.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\):\n    head.extra.weight"):
        import_state_dict(exported, "timm")
    back, _ = import_state_dict(exported, "timm", strict=False)
    assert "head.extra.weight" not in back


def test_missing_keys_are_listed():
    exported, _ = export_state_dict(random_fcmae_state(), "official_dense")
    del exported["stages.2.1.grn.gamma"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\):\n    stages.2.1.grn.gamma"):
        import_state_dict(exported, "official_dense")


def test_wrong_format_is_named():
    exported, _ = export_state_dict(random_fcmae_state(), "official_dense")
    with pytest.raises(CheckpointMismatchError, match="look like format 'official_dense'"):
        import_state_dict(exported, "official_fcmae")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_gives_a_clear_error(tmp_path, suffix):
    exported, _ = export_state_dict(random_fcmae_state(), "timm")
    path = write_state_dict(exported, tmp_path / f"x{suffix}", {})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated, corrupt or not a"):
        read_state_dict(path)


def test_official_fcmae_from_a_classifier_is_refused():
    clf = sparse_mae.create_model("convnextv2_debug", num_classes=3)
    with pytest.raises(ValueError, match="needs an FCMAE checkpoint"):
        export_state_dict(clf.state_dict(), "official_fcmae")


def test_head_true_needs_num_classes():
    with pytest.raises(ValueError, match="needs num_classes"):
        export_state_dict(random_fcmae_state(), "timm", head=True)
    exported, spec = export_state_dict(random_fcmae_state(), "timm", head=True, num_classes=4)
    assert exported["head.fc.weight"].shape == (4, 32) and spec.num_classes == 4


# -- command line ------------------------------------------------------------------------

def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sparse_mae.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_export_then_import_gives_identical_tensors(tmp_path):
    sd = random_fcmae_state()
    torch.save({"model": sd, "step": 7, "config": "model:\n  variant: debug\n"}, tmp_path / "pre.pt")
    r = _cli("export", "ckpt=pre.pt", "format=official_fcmae", "out=off.safetensors",
             "check_backends=[dense_masked]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "conversion check vs dense_masked" in r.stdout
    r = _cli("import", "ckpt=off.safetensors", "format=official_fcmae", "out=ours.pt", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ours = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert ours["metadata"]["variant"] == "debug" and ours["metadata"]["source_format"] == "official_fcmae"
    assert_same_tensors(ours["model"], sd)
    _, meta = read_state_dict(tmp_path / "off.safetensors")
    assert meta["variant"] == "debug" and meta["source_step"] == 7


def test_cli_error_is_one_clear_message(tmp_path):
    torch.save({"model": random_fcmae_state()}, tmp_path / "pre.pt")
    r = _cli("export", "ckpt=pre.pt", "format=timm", "out=x.pt", "variant=tiny", cwd=tmp_path)
    assert r.returncode == 2
    assert "look like variant 'debug'" in r.stderr and "Traceback" not in r.stderr
