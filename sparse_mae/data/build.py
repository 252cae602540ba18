"""Every split of every app from a data config node: what `data=<option>` means, in one place.

`pretrain_dataset` gives unlabelled training images (FCMAE); `labelled_split` gives the
train (random crops) or val (centre crops) split of a labelled option (fine-tuning,
evaluation, the probe); `knn_splits` gives the kNN monitor's bank and queries. Each is one
source (sparse_mae.data.dataset: the format) in the one SeededDataset, checked before it is
returned: a split that cannot be read (empty, unlabelled, a shard file missing or cut short)
is a ValueError naming the fix when the app starts (exit 2), never at the first evaluation.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from sparse_mae.data.dataset import SeededDataset

FORMATS = ("builtin", "imagefolder", "shards", "fashion_mnist")


def pretrain_dataset(data_cfg: DictConfig) -> SeededDataset:
    return split_dataset(data_cfg, "pretrain", augment=True)


def labelled_split(data_cfg: DictConfig, split: str, classes: list[str] | None = None,
                   augment: bool | None = None) -> tuple[SeededDataset, list[str]]:
    """-> (dataset, class names) for split 'train' or 'val', with random crops (`augment`;
    default: for 'train') or centre crops; `classes`: the training split's, for val."""
    dataset = split_dataset(data_cfg, split, classes, augment=(split == "train") if augment is None else augment)
    return dataset, dataset.classes


def knn_splits(data_cfg: DictConfig, knn_cfg: DictConfig) -> tuple[SeededDataset, SeededDataset, int]:
    """-> (bank, queries, number of classes) of the kNN monitor: labelled images at data.size,
    centre-cropped, from knn.root (image folders or shard folders, each as train/ and val/)
    or from the pretraining data's own labels. Decoded on the loader's cores whatever
    data.decode says (the monitor reads a few hundred images in the training process)."""
    if knn_cfg.root is not None:
        from sparse_mae.data.manifest import MANIFEST

        name = "shards" if (Path(knn_cfg.root) / "train" / MANIFEST).is_file() else "imagefolder"
        bank = split_dataset(data_cfg, "train", augment=False, name=name, root=knn_cfg.root, gpu=False)
        query = split_dataset(data_cfg, "val", bank.classes, augment=False, name=name, root=knn_cfg.root, gpu=False)
    elif data_cfg.name == "builtin":  # the pretraining images are drawn from data.seed; queries from seed + 1
        from sparse_mae.data.builtin import BuiltinSource

        transform = eval_transform(data_cfg, fast=False)
        bank = checked(SeededDataset(BuiltinSource(knn_cfg.num_train, data_cfg.draw_size, data_cfg.seed), transform))
        query = checked(SeededDataset(BuiltinSource(knn_cfg.num_val, data_cfg.draw_size, data_cfg.seed + 1),
                                      transform))
    elif data_cfg.name == "fashion_mnist":
        bank = split_dataset(data_cfg, "train", augment=False)
        query = split_dataset(data_cfg, "val", bank.classes, augment=False)
    else:
        raise ValueError(f"knn.enabled=true with data={data_cfg.name}: these images have no labels; pass "
                         f"knn.root=<folder with train/<class>/ and val/<class>/ image folders, or with train/ and "
                         f"val/ labelled shard folders>")
    return bank, query, len(bank.classes)


def split_dataset(data_cfg: DictConfig, split: str, classes: list[str] | None = None, augment: bool = False,
                  name: str | None = None, root: str | None = None, gpu: bool | None = None) -> SeededDataset:
    """Split 'pretrain' (unlabelled), 'train' or 'val' of format `name` (default data.name) under
    `root` (default data.root), checked. `gpu`: data.decode=gpu (default: as data.decode says)."""
    name = name or data_cfg.name
    fast = name == "shards"  # shards hold JPEG bytes: the reduced-decode transforms, uint8 out
    transform = train_transform(data_cfg, fast) if augment else eval_transform(data_cfg, fast)
    if gpu is None:
        gpu = fast and str(data_cfg.get("decode", "cpu")).lower() == "gpu"
    if not gpu:
        return checked(SeededDataset(open_source(data_cfg, name, split, root, classes), transform))
    from sparse_mae.data.gpu_decode import JpegCrop, require_gpu_decode

    require_gpu_decode()  # the machine first: no CUDA is the fix to name, whatever the data
    return checked(SeededDataset(open_source(data_cfg, name, split, root, classes), JpegCrop(transform),
                                 cpu_transform=transform))


def open_source(data_cfg: DictConfig, name: str, split: str, root: str | None, classes: list[str] | None):
    """The source (sparse_mae.data.dataset) of one split of format `name`."""
    labelled = split != "pretrain"
    if name == "builtin":
        from sparse_mae.data.builtin import BuiltinSource

        if not labelled:
            return BuiltinSource(data_cfg.num_images, data_cfg.draw_size, data_cfg.seed)
        count = data_cfg.num_train if split == "train" else data_cfg.num_val
        seed = data_cfg.seed if split == "train" else data_cfg.seed + 1  # val images never seen in training
        return BuiltinSource(count, data_cfg.draw_size, seed)
    if name == "fashion_mnist":
        from sparse_mae.data.fashion_mnist import fashion_mnist_split

        return fashion_mnist_split(data_cfg, split)
    root = Path(root if root is not None else data_cfg.root)
    if name == "imagefolder":
        from sparse_mae.data.imagefolder import image_folder, labelled_image_folder

        return labelled_image_folder(root / split, classes) if labelled else image_folder(root)
    if name == "shards":
        from sparse_mae.data.shards import ShardSource

        return ShardSource(root / split, labelled=True, classes=classes) if labelled else ShardSource(root)
    raise ValueError(f"data.name must be one of {', '.join(FORMATS)}, got {name!r}")


def checked(dataset: SeededDataset) -> SeededDataset:
    dataset.check()
    return dataset


def train_transform(data_cfg: DictConfig, fast: bool):
    """RandomResizedCrop + flip: on a PIL image (normalised float out) or, `fast`, on JPEG bytes (uint8 out)."""
    if fast:
        from sparse_mae.data.decode import FastTrainTransform

        return FastTrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)
    from sparse_mae.data.transforms import TrainTransform

    return TrainTransform(data_cfg.size, scale=tuple(data_cfg.scale), hflip=data_cfg.hflip)


def eval_transform(data_cfg: DictConfig, fast: bool):
    """Resize the shorter side + centre crop, as train_transform for `fast`."""
    if fast:
        from sparse_mae.data.decode import FastEvalTransform

        return FastEvalTransform(data_cfg.size)
    from sparse_mae.data.transforms import EvalTransform

    return EvalTransform(data_cfg.size)
