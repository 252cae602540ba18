"""Units of sparse_mae.train: schedule, checkpoints, RNG state, optimizer groups, seeds."""
from __future__ import annotations

import math
import pickle
import random

import numpy as np
import pytest
import torch

from sparse_mae import create_model
from sparse_mae.train.checkpoint import find_latest, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
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


def test_checkpoints_keep_last_k_with_config_beside(tmp_path):
    for step in (5, 10, 15, 20):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, f"step: {step}\n", keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [15, 20]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000015.pt", "step-00000015.yaml", "step-00000020.pt", "step-00000020.yaml"]
    latest = find_latest(tmp_path)
    assert load_checkpoint(latest)["w"].tolist() == [20.0, 20.0]
    assert latest.with_suffix(".yaml").read_text() == "step: 20\n"


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, tmp_path) is None and resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "nothing-yet") is None  # fresh start
    path = save_checkpoint(tmp_path, 3, {"x": 1})
    assert resolve_resume("auto", tmp_path) == path
    assert resolve_resume(str(path), tmp_path / "elsewhere") == path
    assert resolve_resume(str(tmp_path), tmp_path / "elsewhere") == path
    with pytest.raises(FileNotFoundError, match="resume=auto"):
        resolve_resume(str(tmp_path / "missing.pt"), tmp_path)


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
