"""The kNN monitor of pretraining: it logs kNN accuracy to metrics.jsonl, and a run with it
ends bit for bit like a run without it (it must not touch the run's random streams or
leave the model in another mode)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from sparse_mae.apps.pretrain import compose_config, run_pretrain
from sparse_mae import create_model
from sparse_mae.probe.monitor import KnnMonitor
from sparse_mae.train.checkpoint import load_checkpoint

from tests.test_pretrain import one_thread  # noqa: F401 (autouse fixture: one torch thread)

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data" / "fashion_mnist"


def overrides(out: Path, **extra) -> list[str]:
    # drop path draws from the global RNG in training mode: a monitor that used it, or left
    # the encoder in eval mode, would change every later step
    base = {"data": "fashion_mnist", "data.root": str(SUBSET), "data.size": 64, "data.num_images": 48,
            "data.num_workers": 0, "model": "debug", "model.drop_path_rate": 0.2, "backend": "dense_masked",
            "device": "cpu", "logger": "none", "logger.progress": "false", "batch_size": 8, "epochs": 1,
            "sched.warmup_steps": 1, "recon.num_images": 0, "checkpoint.every_steps": 3, "log_every_steps": 1,
            "knn.num_train": 40, "knn.num_val": 20, "knn.batch_size": 16, "output_dir": str(out)}
    return [f"{k}={v}" for k, v in (base | extra).items()]


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_run_with_the_monitor_ends_bit_for_bit_like_one_without(tmp_path):
    plain = run_pretrain(compose_config(overrides(tmp_path / "plain")))
    watched = run_pretrain(compose_config(overrides(tmp_path / "watched", **{"knn.enabled": "true",
                                                                              "knn.every_steps": 2})))
    assert plain.steps == watched.steps == 6
    assert plain.losses == watched.losses
    a, b = load_checkpoint(plain.checkpoint), load_checkpoint(watched.checkpoint)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])
    knn = [r for r in metrics(watched.metrics) if "knn/top1" in r]
    assert [r["step"] for r in knn] == [2, 4, 6]
    assert all(0 <= r["knn/top1"] <= r["knn/top5"] <= 100 and r["knn/seconds"] > 0 for r in knn)
    assert not any("knn/top1" in r for r in metrics(plain.metrics))  # off by default


def test_the_monitor_restores_each_modules_mode_and_the_global_rng():
    cfg = compose_config(overrides(Path("unused"), **{"knn.enabled": "true", "knn.num_train": 20,
                                                       "knn.num_val": 10}))
    model = create_model("fcmae_convnextv2_debug", drop_path_rate=0.2).train()
    model.encoder.stages[1].eval()  # a mixed state must come back as it was
    modes = {name: m.training for name, m in model.encoder.named_modules()}
    rng = torch.get_rng_state()
    result = KnnMonitor(cfg.data, cfg.knn, torch.device("cpu"))(model.encoder)
    assert {name: m.training for name, m in model.encoder.named_modules()} == modes
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(result) == {"knn/top1", "knn/top5", "knn/seconds"}


def test_the_monitor_learns_what_separable_data_shows():
    # the bank and the queries are the same images: every query's nearest neighbour is itself
    cfg = compose_config(overrides(Path("unused"), **{"knn.k": 1}))
    cfg.data.root = str(SUBSET)
    monitor = KnnMonitor(cfg.data, cfg.knn, torch.device("cpu"))
    monitor.query_set, monitor.query_idx = monitor.bank_set, monitor.bank_idx
    assert monitor(create_model("convnextv2_debug", num_classes=0))["knn/top1"] == 100.0


def test_unlabelled_pretraining_data_needs_a_labelled_root(tmp_path):
    cfg = compose_config(overrides(tmp_path, **{"knn.enabled": "true"}))
    cfg = OmegaConf.merge(cfg, {"data": {"name": "imagefolder"}})
    with pytest.raises(ValueError, match=r"these images have no labels; pass knn.root="):
        KnnMonitor(cfg.data, cfg.knn, torch.device("cpu"))


def test_the_monitor_reads_fashion_mnist_shards_like_the_fashion_mnist_option(tmp_path):
    from sparse_mae.data.prepare import PrepareOptions, prepare_fashion_mnist

    prepare_fashion_mnist(SUBSET, tmp_path / "shards", PrepareOptions(shard_size=200))
    cfg = compose_config(overrides(tmp_path, **{"knn.enabled": "true"}))
    shard_args = [a for a in overrides(tmp_path, **{"data": "shards", "data.root": tmp_path / "shards" / "train",
                                                    "knn.enabled": "true", "knn.root": tmp_path / "shards"})
                  if not a.startswith("data.num_images=")]
    from_shards = compose_config(shard_args)
    encoder = create_model("convnextv2_debug", num_classes=0)
    direct = KnnMonitor(cfg.data, cfg.knn, torch.device("cpu"))(encoder)
    sharded = KnnMonitor(from_shards.data, from_shards.knn, torch.device("cpu"))(encoder)
    # lossless shards, the same centre crops to the bit, the same evenly spaced images: equal
    assert (sharded["knn/top1"], sharded["knn/top5"]) == (direct["knn/top1"], direct["knn/top5"])


@pytest.mark.parametrize("key, value", [("every_steps", 0), ("k", 0), ("temperature", 0.0), ("num_val", -1)])
def test_monitor_ranges_are_checked_even_when_it_is_off(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"knn.{key} must be > 0"):
        compose_config(overrides(tmp_path, **{f"knn.{key}": value}))
