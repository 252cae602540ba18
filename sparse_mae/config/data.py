"""The data options (`data=` / `finetune/data@data=`): what every option has, and each
format's own keys. The datasets they configure: sparse_mae/data/build.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from omegaconf import MISSING

from sparse_mae.config.checks import AREA_RANGE, NON_NEGATIVE, POSITIVE, PROBABILITY, OneOf, Range, opt
from sparse_mae.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from sparse_mae.models.geometry import PATCH

PATCH_MULTIPLE = Range(PATCH, multiple_of=PATCH, hint="the patch size")


@dataclass
class DataConfig:
    """What every data option has."""

    name: str = opt(MISSING, "which data option this is (set by the group)")
    size: int = opt(224, f"crop fed to the model, a multiple of {PATCH} (the patch size)", PATCH_MULTIPLE)
    scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range (pretraining recipe)", AREA_RANGE)
    hflip: float = opt(0.5, "probability of a horizontal flip", PROBABILITY)
    num_workers: Optional[int] = opt(None, "DataLoader worker processes; null: one per core this process may use "
                                           "(its CPU affinity), less one for training (sparse_mae/data/loader.py)",
                                     NON_NEGATIVE)


@dataclass
class DrawnImages:
    """Procedurally drawn images (sparse_mae/data/builtin.py): no download."""

    draw_size: int = opt(256, "images are drawn at this size, then cropped and resized", POSITIVE)
    seed: int = opt(0, "which images are drawn (fine-tuning: the training images; val uses seed + 1)")


@dataclass
class FolderImages:
    root: str = opt(MISSING, "the folder of images (required)")


@dataclass
class FinetuneCrop:
    scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop area range (fine-tuning recipe)", AREA_RANGE)


@dataclass
class BuiltinData(DrawnImages, DataConfig):
    name: str = "builtin"
    num_images: int = opt(2048, "dataset length", POSITIVE)


@dataclass
class ImageFolderData(FolderImages, DataConfig):
    """Every jpg/jpeg/png/webp/bmp under root, recursively (no labels needed)."""

    name: str = "imagefolder"


@dataclass
class LabelledBuiltinData(FinetuneCrop, DrawnImages, DataConfig):
    name: str = "builtin"
    num_train: int = opt(2048, "training images (8 classes of drawn patterns)", POSITIVE)
    num_val: int = opt(512, "validation images, never seen in training", POSITIVE)


@dataclass
class LabelledImageFolderData(FinetuneCrop, FolderImages, DataConfig):
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg (classes sorted by name)."""

    name: str = "imagefolder"


@dataclass
class ShardImages:
    root: str = opt(MISSING, "a shard folder written by `sparse-mae prepare` (required)")
    decode: str = opt("cpu", "cpu: the loader's workers decode and augment (libjpeg at reduced size); gpu: the "
                             "workers only read the JPEG bytes and draw the crops, the training GPU decodes (nvjpeg "
                             "through torchvision) and augments; needs CUDA and torchvision (docs/data.md)",
                      OneOf(("cpu", "gpu")))


@dataclass
class ShardData(ShardImages, DataConfig):
    """Indexed shards from `sparse-mae prepare` (random access; damaged samples skipped, counted)."""

    name: str = "shards"


@dataclass
class LabelledShardData(FinetuneCrop, ShardImages, DataConfig):
    """root/train and root/val: shard folders prepared from ImageNet-style class folders (or from the
    Fashion-MNIST idx files: then data.size=128 as data=fashion_mnist)."""

    name: str = "shards"


@dataclass
class FashionMnistImages:
    """Fashion-MNIST idx files (sparse_mae/data/fashion_mnist.py): 28px grey, 10 classes, 3 equal channels."""

    root: str = opt(FASHION_MNIST_ROOT, "folder of the four idx files, .gz or not (Debian: apt-get install "
                                        "dataset-fashion-mnist)")
    size: int = opt(128, "28px padded to 32, then upsampled 4x: 4x4 patches (docs/fashion-mnist/README.md)")


@dataclass
class FashionMnistData(FashionMnistImages, DataConfig):
    """The 60,000 training images of Fashion-MNIST (labels unused)."""

    name: str = "fashion_mnist"
    num_images: Optional[int] = opt(None, "use the first N training images; null: all 60,000", POSITIVE)


@dataclass
class LabelledFashionMnistData(FinetuneCrop, FashionMnistImages, DataConfig):
    """Fashion-MNIST: train = the training split (or a class-balanced fraction of it), val = the test split."""

    name: str = "fashion_mnist"
    label_fraction: float = opt(1.0, "class-balanced random fraction of the 60,000 training labels used",
                                Range(0, 1, low_open=True))
    label_seed: int = opt(0, "which images that fraction holds")
    num_val: Optional[int] = opt(None, "the first N of the 10,000 test images; null: all", POSITIVE)
