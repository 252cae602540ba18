"""Units of sparse_mae.train: schedule, checkpoints, RNG state, optimizer groups, seeds."""
from __future__ import annotations

import json
import math
import pickle
import random

import numpy as np
import pytest
import torch

from sparse_mae import create_model
from sparse_mae.train.checkpoint import (
    CorruptCheckpointError,
    explicit_resume_path,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    newest_good_checkpoint,
    save_checkpoint,
)
from sparse_mae.train.optim import param_groups_weight_decay
from sparse_mae.train.rng import capture_rng_state, restore_rng_state
from sparse_mae.train.sampler import sample_seed
from sparse_mae.train.schedule import set_lr, warmup_cosine_lr


def test_warmup_then_half_cosine():
    lr = [warmup_cosine_lr(s, total_steps=110, warmup_steps=10, peak_lr=1.0, min_lr=0.1) for s in range(111)]
    assert lr[0] == 0.0 and lr[5] == pytest.approx(0.5) and lr[10] == pytest.approx(1.0)
    assert lr[60] == pytest.approx(0.55)  # half-way down the cosine: (1 + 0.1) / 2
    assert lr[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))  # monotone after warmup
    assert warmup_cosine_lr(5, 10, 0, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, 10, 11, 1.0)


def test_set_lr_applies_per_group_scale():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.5}])
    set_lr(opt, 0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.2, 0.1]


def test_checkpoints_keep_last_k_with_config_and_record_beside(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, f"step: {step}\n", keep_last=2,
                        run_id="run-a")
    assert [c.step for c in list_checkpoints(tmp_path)] == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        f"step-000000{s}.{ext}" for s in (15, 20) for ext in ("json", "pt", "yaml")]
    latest = find_latest(tmp_path)
    assert load_checkpoint(latest)["w"].tolist() == [20.0, 20.0]
    assert latest.with_suffix(".yaml").read_text() == "step: 20\n"
    record = json.loads(latest.with_suffix(".json").read_text())
    assert record["run_id"] == "run-a" and record["bytes"] == latest.stat().st_size and len(record["sha256"]) == 64


def test_rotation_keeps_what_the_run_wrote_last_and_never_touches_other_files(tmp_path):
    """Issue 11, item 1: a run's own new checkpoints are never deleted to keep older ones
    with higher step numbers; another run's checkpoints and unrecorded files are not ours."""
    for step in (12, 14, 16):
        save_checkpoint(tmp_path, step, {"w": torch.zeros(1)}, keep_last=2, run_id="earlier-run")
    torch.save({"w": torch.ones(1)}, tmp_path / "step-00000030.pt")  # hand-made, no record
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, {"w": torch.full((1,), float(step))}, keep_last=2, run_id="this-run")
    by_run = {}
    for c in list_checkpoints(tmp_path):
        by_run.setdefault(c.run_id, []).append(c.step)
    assert by_run == {None: [30], "earlier-run": [14, 16], "this-run": [6, 8]}
    assert find_latest(tmp_path).name == "step-00000008.pt"  # last written, not the highest step


def test_resume_branch_from_an_earlier_step_continues_what_it_wrote_last(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, {"step": step, "model": {}, "optimizer": {}}, keep_last=0, run_id="r")
    save_checkpoint(tmp_path, 3, {"step": 3, "model": {}, "optimizer": {}}, keep_last=0, run_id="r")  # resumed at 2
    path, state = newest_good_checkpoint(tmp_path)
    assert path.name == "step-00000003.pt" and state["step"] == 3


def _training_state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((64,), float(step))}, "optimizer": {"state": {}}}


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "unrecorded_older_version_files"])
def test_newest_good_checkpoint_skips_damaged_ones_and_names_them(tmp_path, damage):
    """Issue 11, item 2: a corrupt newest checkpoint falls back to the older good one."""
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, _training_state(step), keep_last=0, run_id="r")
    newest = tmp_path / "step-00000006.pt"
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":  # same size: only the checksum can tell
        newest.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:  # checkpoints of a version that wrote no records: ordered by step, read to check
        for record in tmp_path.glob("*.json"):
            record.unlink()
        newest.write_bytes(b"not a zip archive at all")
    warnings = []
    path, state = newest_good_checkpoint(tmp_path, warn=warnings.append)
    assert path.name == "step-00000004.pt" and state["step"] == 4
    assert len(warnings) == 1 and "step-00000006.pt" in warnings[0]
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(newest)


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    save_checkpoint(tmp_path, 2, _training_state(2), run_id="r")
    (tmp_path / "step-00000002.pt").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="none of the 1 checkpoints .* is usable"):
        newest_good_checkpoint(tmp_path, warn=lambda m: None)
    assert newest_good_checkpoint(tmp_path / "empty") == (None, None)


def test_explicit_resume_path(tmp_path):
    assert explicit_resume_path(None) is None and explicit_resume_path("auto") is None
    path = save_checkpoint(tmp_path, 3, {"x": 1})
    assert explicit_resume_path(str(path)) == path
    assert explicit_resume_path(str(tmp_path)) == path
    with pytest.raises(FileNotFoundError, match="resume=auto"):
        explicit_resume_path(str(tmp_path / "missing.pt"))


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_pickled_code(tmp_path):
    bad = tmp_path / "step-00000001.pt"
    torch.save({"evil": _Payload()}, bad)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(bad)


def test_rng_state_survives_a_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    save_checkpoint(tmp_path, 1, {"rng": capture_rng_state()})
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(find_latest(tmp_path))["rng"])
    got = (random.random(), np.random.randn(3).tolist(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_no_weight_decay_on_biases_norms_grn_and_mask_token():
    model = create_model("fcmae_convnextv2_debug")
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "mask_token" not in decayed and all(model.get_parameter(n).ndim > 1 for n in decayed)
    assert "encoder.stem.0.weight" in decayed and "pred.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_sample_seeds_are_distinct():
    seeds = {sample_seed(s, e, p) for s in range(3) for e in range(5) for p in range(2000)}
    assert len(seeds) == 3 * 5 * 2000 and all(0 <= x < 2**63 for x in seeds)
    assert not math.isclose(sample_seed(0, 0, 0), sample_seed(0, 0, 1))


def test_the_lr_rule_scales_the_base_lr_by_the_effective_batch_over_256_unless_lr_is_given():
    from omegaconf import OmegaConf

    from sparse_mae.train.schedule import linear_scaled_lr, peak_lr

    assert peak_lr(OmegaConf.create({"lr": None, "blr": 1.5e-4}), 4096) == pytest.approx(2.4e-3)  # ConvNeXt V2's
    assert peak_lr(OmegaConf.create({"lr": 1e-3, "blr": 1.5e-4}), 4096) == 1e-3
    assert linear_scaled_lr(0.1, 512) == pytest.approx(0.2)
