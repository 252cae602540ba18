"""`finetune`, `eval` and `probe` on ResNets (model=resnet*): from a SparK checkpoint, a timm
export or random init, on tiny data; ResNet layer decay; the stochastic-depth config error."""
from __future__ import annotations

import math

import pytest
import torch

import sparse_mae
from sparse_mae.apps.evaluate import compose_eval_config, run_eval
from sparse_mae.apps.finetune import compose_config, load_pretrained, run_finetune
from sparse_mae.apps.probe import compose_config as compose_probe_config
from sparse_mae.apps.probe import run_probe
from sparse_mae.config import ConfigError
from sparse_mae.convert import export_state_dict, write_state_dict
from sparse_mae.train.optim import param_groups_layer_decay, resnet_layer_id

from tests.test_finetune import ft_overrides
from tests.test_probe import probe_overrides
from tests.test_pretrain import one_thread  # noqa: F401 (autouse fixture: one torch thread)

RESNET = {"model": "resnet_debug", "model.drop_path_rate": 0}


def spark_checkpoint(path, seed: int = 0) -> dict:
    """A SparK model's state dict with every weight moved off its init, saved as pretraining saves it."""
    torch.manual_seed(seed)
    model = sparse_mae.create_model("spark_resnet_debug")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"model": model.state_dict(), "step": 3}, path)
    return model.state_dict()


def test_resnet_layer_decay_has_one_group_per_block():
    model = sparse_mae.create_model("resnet50", num_classes=10)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert sorted(scales) == list(range(18))  # stem, 16 blocks, fc
    assert scales[17] == 1.0 and math.isclose(scales[0], 0.8 ** 17)
    assert resnet_layer_id("layer3.5.conv2.weight", (3, 4, 6, 3)) == 1 + 3 + 4 + 5
    assert resnet_layer_id("layer1.0.downsample.1.bias", (3, 4, 6, 3)) == 1
    for g in groups:  # biases and BN gains are not decayed
        assert all((p.ndim > 1) == (g["weight_decay"] > 0) for p in g["params"])


def test_pretrained_spark_encoder_loads_and_fc_stays_fresh(tmp_path):
    sd = spark_checkpoint(tmp_path / "spark.pt")
    clf = sparse_mae.create_model("resnet_debug", num_classes=4)
    fc_before = clf.fc.weight.clone()
    source = load_pretrained(clf, str(tmp_path / "spark.pt"), "resnet_debug")
    assert "spark checkpoint" in source
    assert torch.equal(clf.layer2[0].conv2.weight, sd["encoder.layer2.0.conv2.weight"])
    assert torch.equal(clf.bn1.running_var, sd["encoder.bn1.running_var"])
    assert torch.equal(clf.fc.weight, fc_before)
    with pytest.raises(ValueError, match="pass model=resnet_debug"):
        load_pretrained(sparse_mae.create_model("resnet18", num_classes=4), str(tmp_path / "spark.pt"), "resnet18")


def test_finetune_then_eval_a_resnet_from_a_spark_checkpoint(tmp_path):
    spark_checkpoint(tmp_path / "spark.pt")
    cfg = compose_config(ft_overrides(tmp_path / "run", **RESNET, pretrained=tmp_path / "spark.pt"))
    result = run_finetune(cfg)
    assert result.steps == 8 and all(math.isfinite(v) for v in result.losses)
    assert {e["weights"] for e in result.evals} == {"model", "ema"}
    summary = run_eval(compose_eval_config([f"ckpt={result.checkpoint}", "data.size=64", "data.draw_size=64",
                                            "data.num_val=64", "data.num_workers=0", f"out={tmp_path / 'ev'}"]))
    final_ema = [e for e in result.evals if e["weights"] == "ema" and e["step"] == result.steps][0]
    assert summary["top1"] == pytest.approx(final_ema["top1"]) and summary["weights"] == "ema"
    assert sum(map(sum, summary["confusion"])) == 64


def test_finetune_from_a_timm_export(tmp_path):
    sd = spark_checkpoint(tmp_path / "spark.pt")
    timm_sd, _ = export_state_dict(sd, "timm", head=True, num_classes=1000)
    write_state_dict(timm_sd, tmp_path / "timm.safetensors", {})
    result = run_finetune(compose_config(ft_overrides(tmp_path / "run", **RESNET, max_steps=1,
                                                      pretrained=tmp_path / "timm.safetensors")))
    assert result.steps == 1


def test_resnet_finetune_refuses_stochastic_depth():
    with pytest.raises(ConfigError, match="set model.drop_path_rate=0"):
        compose_config(["model=resnet18"])


def test_probe_a_resnet_from_spark_and_at_random_init(tmp_path):
    spark_checkpoint(tmp_path / "spark.pt")
    pretrained = run_probe(compose_probe_config(probe_overrides(model="resnet_debug", ckpt=tmp_path / "spark.pt")))
    random = run_probe(compose_probe_config(probe_overrides(model="resnet_debug")))
    for r in (pretrained, random):
        assert (r["num_classes"], r["feature_dim"]) == (10, 64)
        for method in ("knn", "linear"):
            assert 10.0 < r[method]["top1"] <= r[method]["top5"] <= 100.0
    assert "spark" in pretrained["source"] and "random-init resnet_debug" in random["source"]
