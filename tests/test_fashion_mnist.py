"""Fashion-MNIST: the idx reader, the data options of pretrain / finetune, and the committed
subset (tests/data/fashion_mnist, built by tools/make_fashion_mnist_subset.py)."""
from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_mae.data.build import labelled_split as build_split
from sparse_mae.apps.finetune import compose_config as finetune_config
from sparse_mae.apps.pretrain import compose_config as pretrain_config
from sparse_mae.apps.pretrain import run_pretrain
from sparse_mae.data.fashion_mnist import (
    CLASSES,
    DEFAULT_ROOT,
    FashionMnist,
    idx_path,
    labelled_fraction,
    read_idx,
    write_idx,
)

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO / "tests" / "data" / "fashion_mnist"


def test_the_committed_subset_is_class_balanced_and_in_the_original_format():
    train, test = FashionMnist(SUBSET, "train"), FashionMnist(SUBSET, "test")
    assert (len(train), len(test)) == (320, 160)
    assert np.bincount(train.labels, minlength=10).tolist() == [32] * 10
    assert np.bincount(test.labels, minlength=10).tolist() == [16] * 10
    assert train.images.dtype == np.uint8 and train.images.shape == (320, 28, 28)
    assert "MIT" in (SUBSET / "README.md").read_text()


def test_grey_images_become_three_equal_channels_padded_with_background_then_upsampled():
    data = FashionMnist(SUBSET, "train")
    small = np.asarray(data.rgb(3))
    assert small.shape == (32, 32, 3)
    assert (small[..., 0] == small[..., 1]).all() and (small[..., 1] == small[..., 2]).all()
    assert (small[2:30, 2:30, 0] == data.grey(3)).all()  # the image, centred
    assert small[:2].max() == 0 and small[:, :2].max() == 0  # a border of background
    big = np.asarray(data.rgb(3, 128))
    assert big.shape == (128, 128, 3) and (big[..., 0] == big[..., 2]).all()


@pytest.mark.parametrize("name", ["images.idx", "images.idx.gz"])
def test_idx_files_round_trip_gzipped_or_not(tmp_path, name):
    array = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    raw = gzip.decompress((SUBSET / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "cut").write_bytes(raw[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(tmp_path / "cut")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "png")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_missing_files_name_the_package_and_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist.*data\.root="):
        FashionMnist(tmp_path, "train")
    shutil.copy(SUBSET / "train-images-idx3-ubyte.gz", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte"):
        FashionMnist(tmp_path, "train")


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    shutil.copy(SUBSET / "train-images-idx3-ubyte.gz", tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="320 images but 5 labels"):
        FashionMnist(tmp_path, "train")


def test_the_default_root_is_debians_and_the_default_size_four_patches_a_side():
    cfg = pretrain_config(["data=fashion_mnist"])
    assert cfg.data.root == DEFAULT_ROOT == "/usr/share/datasets/fashion-mnist"
    assert cfg.data.size == 128 and finetune_config(["finetune/data@data=fashion_mnist"]).data.size == 128


def test_label_fraction_is_class_balanced_and_drawn_from_its_seed():
    labels = FashionMnist(SUBSET, "train").labels
    a, b = labelled_fraction(labels, 0.25, 0), labelled_fraction(labels, 0.25, 1)
    assert np.bincount(labels[a], minlength=10).tolist() == [8] * 10
    assert not np.array_equal(a, b)
    assert np.array_equal(a, labelled_fraction(labels, 0.25, 0))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        labelled_fraction(labels, 0.0, 0)


def test_finetune_splits_train_fraction_and_test(tmp_path):
    cfg = finetune_config(["finetune/data@data=fashion_mnist", f"data.root={SUBSET}", "data.size=64",
                           "data.label_fraction=0.5", "data.num_val=40"])
    train, classes = build_split(cfg.data, "train")
    val, _ = build_split(cfg.data, "val", classes)
    assert (len(train), len(val), classes) == (160, 40, list(CLASSES))
    item = val[(0, 0)]
    assert item["image"].shape == (3, 64, 64) and item["label"] == int(FashionMnist(SUBSET, "test").labels[0])
    with pytest.raises(ValueError, match=r"data.label_fraction must be in \(0, 1\]"):
        finetune_config(["finetune/data@data=fashion_mnist", f"data.root={SUBSET}", "data.label_fraction=1.5"])


def test_pretraining_runs_on_fashion_mnist(tmp_path):
    torch.set_num_threads(1)
    result = run_pretrain(pretrain_config([
        "data=fashion_mnist", f"data.root={SUBSET}", "data.size=64", "data.num_images=32", "data.num_workers=0",
        "model=debug", "backend=dense_masked", "device=cpu", "logger=none", "logger.progress=false",
        "batch_size=8", "epochs=1", "sched.warmup_steps=1", "recon.num_images=2", f"output_dir={tmp_path}"]))
    assert result.steps == 4 and all(np.isfinite(result.losses))
    assert result.reconstruction.exists()


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_subset_script_rebuilds_the_committed_files_from_the_package(tmp_path):
    subprocess.run([sys.executable, str(REPO / "tools" / "make_fashion_mnist_subset.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    for split in ("train", "test"):
        for what in ("images", "labels"):
            committed = idx_path(SUBSET, split, what)
            assert (tmp_path / committed.name).read_bytes() == committed.read_bytes(), committed.name
