"""Datasets from a data config node: what `data=<option>` means, in one place for every app.

`pretrain_dataset` gives unlabelled training images (FCMAE); `labelled_split` gives the
train (random crops) or val (centre crops) split of a labelled option (fine-tuning,
evaluation). Items are requested as (index, sample seed); see sparse_mae.data.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.data.transforms import EvalTransform, TrainTransform


def pretrain_dataset(data_cfg: DictConfig):
    transform = TrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
    if data_cfg.name == "builtin":
        from sparse_mae.data.builtin import BuiltinDataset

        return BuiltinDataset(data_cfg.num_images, data_cfg.draw_size, transform, seed=data_cfg.seed)
    if data_cfg.name == "shards":
        from sparse_mae.data.decode import FastTrainTransform
        from sparse_mae.data.shards import ShardDataset

        return ShardDataset(data_cfg.root, FastTrainTransform(data_cfg.size, scale=tuple(data_cfg.scale),
                                                              hflip=data_cfg.hflip))
    if data_cfg.name == "fashion_mnist":
        from sparse_mae.data.fashion_mnist import fashion_mnist_split

        return fashion_mnist_split(data_cfg, "pretrain", transform)
    if data_cfg.name == "imagefolder":
        from sparse_mae.data.imagefolder import ImageFolderDataset

        return ImageFolderDataset(data_cfg.root, transform)
    raise ValueError(f"data.name must be builtin, imagefolder, shards or fashion_mnist, got {data_cfg.name!r}")


def labelled_split(data_cfg: DictConfig, split: str, classes: list[str] | None = None,
                   augment: bool | None = None):
    """-> (dataset, class names) for split 'train' or 'val', with random crops (`augment`;
    default: for 'train') or centre crops."""
    augment = (split == "train") if augment is None else augment
    if augment:
        transform = TrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
    else:
        transform = EvalTransform(data_cfg.size)
    if data_cfg.name == "builtin":
        from sparse_mae.data.builtin import CLASSES, BuiltinDataset

        count = data_cfg.num_train if split == "train" else data_cfg.num_val
        seed = data_cfg.seed if split == "train" else data_cfg.seed + 1  # val images never seen in training
        return BuiltinDataset(count, data_cfg.draw_size, transform, seed=seed), list(CLASSES)
    if data_cfg.name == "imagefolder":
        from sparse_mae.data.imagefolder import LabelledImageFolderDataset

        ds = LabelledImageFolderDataset(Path(data_cfg.root) / split, transform, classes)
        return ds, ds.classes
    if data_cfg.name == "shards":
        from sparse_mae.data.decode import FastEvalTransform, FastTrainTransform
        from sparse_mae.data.shards import ShardDataset

        fast = (FastTrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
                if augment else FastEvalTransform(data_cfg.size))
        ds = ShardDataset(Path(data_cfg.root) / split, fast, labelled=True, classes=classes)
        return ds, ds.classes
    if data_cfg.name == "fashion_mnist":
        from sparse_mae.data.fashion_mnist import fashion_mnist_split

        ds = fashion_mnist_split(data_cfg, split, transform)
        return ds, ds.classes
    raise ValueError(f"data.name must be builtin, imagefolder, shards or fashion_mnist, got {data_cfg.name!r}")
