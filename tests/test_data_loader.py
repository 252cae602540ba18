"""The one data path: one DataLoader construction, one batch-to-model function, one worker default."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from sparse_mae.data import loader as loader_module
from sparse_mae.data.builtin import BuiltinSource
from sparse_mae.data.dataset import SeededDataset
from sparse_mae.data.loader import default_workers, make_loader, to_model
from sparse_mae.data.transforms import EvalTransform, model_input

PACKAGE = Path(__file__).resolve().parents[1] / "sparse_mae"
BATCH_CONSUMERS = ("train/engine.py", "train/evaluation.py", "probe/features.py", "probe/monitor.py",
                   "apps/pretrain.py")


def test_the_default_worker_count_follows_the_usable_cores(monkeypatch):
    """It used to be a fixed number per data option: 8 image-folder workers on a 2-core machine."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: set(range(6)))
    assert default_workers() == 5  # one core is the training process's
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two training processes on this node share the cores
    assert default_workers() == 2
    monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda pid: {0})
    assert default_workers() == 1
    assert make_loader(SeededDataset(BuiltinSource(4, 16), EvalTransform(16)), 2).num_workers == 1


@pytest.mark.parametrize("app, data", [("pretrain", "builtin"), ("pretrain", "imagefolder"), ("pretrain", "shards"),
                                       ("pretrain", "fashion_mnist"), ("finetune", "imagefolder"),
                                       ("finetune", "shards"), ("finetune", "fashion_mnist")])
def test_every_data_option_defaults_to_the_one_worker_default(app, data):
    from sparse_mae.apps.app import compose

    group = "data" if app == "pretrain" else "finetune/data@data"
    cfg = compose(app, [f"{group}={data}", "data.root=/nowhere"] if data != "builtin" else [], check=False)
    assert cfg.data.num_workers is None


def test_one_loader_construction_and_no_consumer_decodes_or_normalises_itself():
    constructions = [p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                     for _ in re.finditer(r"\bDataLoader\(", p.read_text())]
    assert constructions == ["data/loader.py"]
    for name in BATCH_CONSUMERS:
        text = (PACKAGE / name).read_text()
        assert not re.search(r"data\.(gpu_decode|transforms) import", text), name


def test_to_model_collates_moves_and_normalises_keeping_the_bookkeeping_on_the_cpu():
    ds = SeededDataset(BuiltinSource(4, 16), lambda image, seed: torch.full((3, 8, 8), seed % 256, dtype=torch.uint8))
    items = [ds[(i, 10 + i)] for i in range(3)]
    batch = to_model(items, torch.device("cpu"))
    assert batch["image"].dtype == torch.float32
    assert torch.equal(batch["image"], model_input(torch.stack([it["image"] for it in items])))
    assert batch["index"].tolist() == [0, 1, 2] and batch["skipped"].tolist() == [0, 0, 0]
    assert batch["seed"].tolist() == [10, 11, 12] and batch["label"].tolist() == [0, 1, 2]
