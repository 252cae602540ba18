"""Checkpoints from outside are untrusted: key names, indices and sizes are checked before
any model (even a meta-device one) is built, so a crafted file fails at once with an error
that names what is wrong, through every entry point that reads checkpoints."""
from __future__ import annotations

import sys

import pytest
import torch

import sparse_mae
from sparse_mae.convert import (
    CheckpointMismatchError,
    export_state_dict,
    import_state_dict,
    inspect_state_dict,
)
from sparse_mae.convert import layouts


@pytest.fixture
def nothing_is_built(monkeypatch):
    """Fail the test the moment a layout (a meta-device model) is built: the bug was that a
    layout for 300001 decoder blocks was built, for every variant, before any check."""

    def refuse(spec):
        raise AssertionError(f"a model layout was built for a crafted checkpoint: {spec}")

    layouts.layout.cache_clear()  # so no layout can come from the cache either
    monkeypatch.setattr(layouts, "canonical_shapes", refuse)
    yield
    layouts.layout.cache_clear()


def _spread(value: float, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of `shape` backed by a single element: tiny on disk, absurd once cloned."""
    return torch.full((1,) * len(shape), value).expand(*shape)


def debug_fcmae() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return sparse_mae.create_model("fcmae_convnextv2_debug").state_dict()


def debug_classifier(num_classes: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return sparse_mae.create_model("convnextv2_debug", num_classes=num_classes).state_dict()


# (name, format, state dict factory, what the error must say)
CRAFTED_FOREIGN = [
    ("huge_decoder_index", "official_fcmae",
     lambda: {"decoder.300000.dwconv.weight": torch.zeros(512, 1, 7, 7)},
     r"decoder\.300000\.dwconv\.weight.*decoder block 300000"),
    ("huge_stage_index", "official_dense",
     lambda: {"downsample_layers.99999999.0.weight": torch.zeros(40, 3, 4, 4)},
     r"downsample_layers\.99999999\.0\.weight.*stage 99999999"),
    ("huge_block_index", "official_dense",
     lambda: {"stages.2.123456789.dwconv.weight": torch.zeros(160, 1, 7, 7)},
     r"stages\.2\.123456789\.dwconv\.weight.*block 123456789 of stage 2.*at most 27"),
    ("block_index_past_every_variant", "timm",
     lambda: {"stages.0.blocks.3.conv_dw.weight": torch.zeros(40, 1, 7, 7)},
     r"block 3 of stage 0.*at most 3"),
    ("absurd_digit_string", "official_fcmae",
     lambda: {"decoder." + "9" * 5000 + ".dwconv.weight": torch.zeros(1)},
     r"decoder block 9{8}"),
    ("many_keys", "official_dense",
     lambda: {f"junk.{i}": torch.zeros(()) for i in range(200_000)},
     r"200000 entries.*at most"),
    ("non_string_key", "official_dense",
     lambda: {7: torch.zeros(3)},
     r"key 7 .*not a string"),
    ("non_tensor_value", "official_fcmae",
     lambda: {"mask_token": [1, 2, 3]},
     r"mask_token.*not a tensor \(type list\)"),
    ("sparse_tensor", "official_dense",
     lambda: {"head.weight": torch.sparse_coo_tensor(torch.zeros(2, 1, dtype=torch.long), torch.ones(1),
                                                     size=(1000, 320), check_invariants=True)},
     r"head\.weight.*layout torch\.sparse_coo.*dense"),
    ("absurd_in_chans", "official_dense",
     lambda: {"downsample_layers.0.0.weight": _spread(0.0, (40, 10**9, 4, 4))},
     r"downsample_layers\.0\.0\.weight.*10{9} input channels.*at most"),
    ("absurd_num_classes", "official_dense",
     lambda: {"head.weight": _spread(0.0, (10**10, 320))},
     r"head\.weight.*10{10} classes.*at most"),
    ("absurd_decoder_dim", "official_fcmae",
     lambda: {"proj.weight": _spread(0.0, (10**8, 320, 1, 1))},
     r"proj\.weight.*decoder width of 10{8} \(at most 4096"),
]


@pytest.mark.parametrize("name,fmt,make,message", CRAFTED_FOREIGN, ids=[c[0] for c in CRAFTED_FOREIGN])
def test_crafted_state_dicts_fail_before_anything_is_built(name, fmt, make, message, nothing_is_built):
    with pytest.raises(CheckpointMismatchError, match=message):
        import_state_dict(make(), fmt)


def _shared_storage_official_dense() -> dict[str, torch.Tensor]:
    """A well-formed debug classifier whose head weight is one element spread over its shape."""
    sd, _ = export_state_dict(debug_classifier(), "official_dense")
    sd["head.weight"] = _spread(0.5, tuple(sd["head.weight"].shape))
    return sd


def test_tensor_whose_elements_share_storage_is_refused():
    """Right shape, but nothing behind it: cloning such tensors lets a tiny file demand any
    amount of memory, so the check refuses them before conversion."""
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight.*shares? .*storage.*contiguous"):
        import_state_dict(_shared_storage_official_dense(), "official_dense")


def test_odd_key_names_are_reported_as_unexpected_not_crashed_on():
    sd, _ = export_state_dict(debug_classifier(), "timm")
    for odd in ("stages.x.5.weight", "stages.1", "decoder", "stages.1.blocks", "7", "stages.²", "stages.².5.weight"):
        with pytest.raises(CheckpointMismatchError, match=r"unexpected keys \(1\)"):
            import_state_dict({**sd, odd: torch.zeros(1)}, "timm")


def test_a_real_checkpoint_still_passes_the_checks():
    sd, spec = export_state_dict(debug_fcmae(), "official_fcmae")
    back, back_spec = import_state_dict(sd, "official_fcmae")
    assert back_spec == spec and set(back) == set(debug_fcmae())


def test_deeper_decoder_within_bounds_is_accepted():
    """The bound is on absurd depths, not on FCMAE decoders deeper than the paper's one block."""
    model = sparse_mae.create_model("fcmae_convnextv2_debug", decoder_depth=3, decoder_dim=64)
    spec = inspect_state_dict(model.state_dict(), "sparse_mae")
    assert (spec.decoder_depth, spec.decoder_dim) == (3, 64)


# -- through the apps -------------------------------------------------------------------

def _compose(app: str, overrides: list[str]):
    from sparse_mae.apps.app import compose

    return compose(app, overrides)


IN_FILES = [c for c in CRAFTED_FOREIGN if c[0] not in ("non_string_key", "non_tensor_value", "many_keys")]


@pytest.mark.parametrize("name,fmt,make,message", IN_FILES, ids=[c[0] for c in IN_FILES])
def test_import_app_refuses_crafted_files(name, fmt, make, message, tmp_path, nothing_is_built):
    from sparse_mae.apps.import_ckpt import run_import

    path = tmp_path / "crafted.pt"
    torch.save(make(), path)
    cfg = _compose("import", [f"ckpt={path}", f"format={fmt}", f"out={tmp_path / 'out.pt'}"])
    with pytest.raises(CheckpointMismatchError, match=message):
        run_import(cfg)
    assert not (tmp_path / "out.pt").exists()


def test_import_command_reports_the_crafted_key_and_exits_2(tmp_path, monkeypatch, capsys, nothing_is_built):
    """The exact report of issue 11: one key, `decoder.300000.dwconv.weight`."""
    from sparse_mae.apps import import_ckpt

    path = tmp_path / "crafted.pt"
    torch.save({"model": {"decoder.300000.dwconv.weight": torch.zeros(512, 1, 7, 7)}}, path)
    monkeypatch.setattr(sys, "argv", ["sparse-mae import", f"ckpt={path}", "format=official_fcmae",
                                      f"out={tmp_path / 'out.pt'}"])
    assert import_ckpt.main() == 2
    err = capsys.readouterr().err
    assert "decoder.300000.dwconv.weight" in err and "decoder block 300000" in err


def test_import_command_reports_a_non_string_key_and_exits_2(tmp_path, monkeypatch, capsys):
    """Was an AttributeError traceback from reading the file."""
    from sparse_mae.apps import import_ckpt

    path = tmp_path / "crafted.pt"
    torch.save({7: torch.zeros(3)}, path)
    monkeypatch.setattr(sys, "argv", ["sparse-mae import", f"ckpt={path}", "format=official_dense",
                                      f"out={tmp_path / 'out.pt'}"])
    assert import_ckpt.main() == 2
    assert "key 7 is not a string" in capsys.readouterr().err


# Our own layout, as export / finetune / eval read it.
CRAFTED_OURS = [
    ("huge_decoder_index", lambda: {**debug_fcmae(), "decoder.300000.conv_dw.weight": torch.zeros(512, 1, 7, 7)},
     r"decoder\.300000\.conv_dw\.weight.*decoder block 300000"),
    ("huge_block_index", lambda: {**debug_classifier(), "stages.3.blocks.4000000000.norm.weight": torch.zeros(32)},
     r"block 4000000000 of stage 3"),
    ("huge_stage_index", lambda: {"encoder.stages.70000.downsample.1.weight": torch.zeros(1)},
     r"encoder\.stages\.70000.*stage 70000"),
    ("absurd_in_chans", lambda: {**debug_classifier(), "stem.0.weight": _spread(0.0, (8, 10**9, 4, 4))},
     r"stem\.0\.weight.*10{9} input channels"),
    ("absurd_num_classes", lambda: {**debug_classifier(), "head.fc.weight": _spread(0.0, (10**10, 32)),
                                    "head.fc.bias": _spread(0.0, (10**10,))},
     r"head\.fc\.weight.*10{10} classes"),
    ("absurd_decoder_dim", lambda: {**debug_fcmae(), "proj.weight": _spread(0.0, (10**8, 32, 1, 1))},
     r"proj\.weight.*decoder width of 10{8}"),
]


@pytest.mark.parametrize("name,make,message", CRAFTED_OURS, ids=[c[0] for c in CRAFTED_OURS])
def test_export_app_refuses_crafted_files(name, make, message, tmp_path, nothing_is_built):
    from sparse_mae.apps.export import run_export

    path = tmp_path / "crafted.pt"
    torch.save({"model": make(), "step": 3}, path)
    cfg = _compose("export", [f"ckpt={path}", "format=timm", f"out={tmp_path / 'out.safetensors'}"])
    with pytest.raises(CheckpointMismatchError, match=message):
        run_export(cfg)
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("name,make,message", CRAFTED_OURS, ids=[c[0] for c in CRAFTED_OURS])
def test_finetune_load_pretrained_refuses_crafted_files(name, make, message, tmp_path, nothing_is_built):
    from sparse_mae.apps.finetune import load_pretrained

    path = tmp_path / "crafted.pt"
    torch.save({"model": make()}, path)
    model = sparse_mae.create_model("convnextv2_debug", num_classes=4)  # the run's own model, built first
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=message):
        load_pretrained(model, str(path), "debug")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_eval_load_classifier_refuses_a_crafted_file(tmp_path, nothing_is_built):
    from sparse_mae.apps.evaluate import load_classifier

    path = tmp_path / "crafted.pt"
    torch.save({"model": {**debug_classifier(), "head.fc.weight": _spread(0.0, (10**10, 32))}}, path)
    with pytest.raises(CheckpointMismatchError, match=r"10{10} classes"):
        load_classifier(path)


def test_shared_storage_is_refused_through_the_import_app(tmp_path):
    from sparse_mae.apps.import_ckpt import run_import

    path = tmp_path / "crafted.pt"
    torch.save(_shared_storage_official_dense(), path)
    cfg = _compose("import", [f"ckpt={path}", "format=official_dense", f"out={tmp_path / 'out.pt'}"])
    with pytest.raises(CheckpointMismatchError, match=r"head\.weight"):
        run_import(cfg)


def test_bounds_cover_every_known_variant():
    """The limits derive from the variant table: the largest real layout passes them."""
    assert layouts.MAX_STAGE_DEPTHS == tuple(max(v.depths[i] for v in layouts.VARIANTS.values())
                                             for i in range(4))
    huge = layouts.canonical_shapes(layouts.Spec("huge", "fcmae", decoder_depth=layouts.MAX_DECODER_DEPTH,
                                                 decoder_dim=layouts.MAX_DECODER_DIM))
    assert len(huge) <= layouts.MAX_KEYS
    spec = inspect_state_dict({k: torch.empty(s, device="meta") for k, s in huge.items()}, "sparse_mae")
    assert (spec.variant, spec.decoder_depth, spec.decoder_dim) == ("huge", layouts.MAX_DECODER_DEPTH,
                                                                    layouts.MAX_DECODER_DIM)
