"""Fashion-MNIST (Zalando, MIT licence): the idx files, read by index, as RGB images.

The files are those of Debian's `dataset-fashion-mnist` (installed under DEFAULT_ROOT), or
the same four files from anywhere else, gzipped or not:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]   60,000 images
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]    10,000 images (the test split)

idx format (big-endian): a magic number whose third byte is the element type (0x08 =
uint8) and whose fourth is the number of dimensions, one uint32 per dimension, then the
elements in C order. Images are 28x28 grey, 0 = background.

`FashionMnist` is the source (random access, labels, grey -> 3 equal channels, optional
upsampling), meant for every consumer: the data options of pretrain / finetune / probe
(`FashionMnistSource` below) and the shard writer (sparse_mae/data/prepare.py stores
`padded(i)` losslessly). docs/fashion-mnist/README.md explains why the apps feed 128px (pad 28 -> 32 with background, then 4x).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_mae.io import atomic_write_bytes

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
INSTALL_HINT = "apt-get install dataset-fashion-mnist"
CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
SPLITS = {"train": "train", "test": "t10k"}  # split name -> file prefix
SIDE = 28
# 28px images are padded with background to 32 (one 32px patch at 1x, so any size that is
# a multiple of 32 is an exact integer upsampling and every patch holds whole source pixels)
PADDED = 32
UBYTE = 0x08


def idx_name(split: str, what: str) -> str:
    """The file name (without .gz) of `split` ('train' / 'test') and `what` ('images' / 'labels')."""
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {', '.join(SPLITS)}, got {split!r}")
    return f"{SPLITS[split]}-{what}-idx{3 if what == 'images' else 1}-ubyte"


def idx_path(root: str | os.PathLike, split: str, what: str) -> Path:
    """The file of `split` ('train' / 'test') and `what` ('images' / 'labels'), .gz or not."""
    name = idx_name(split, what)
    root = Path(root).expanduser()
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}[.gz] is not in {root}. Install the data set with `{INSTALL_HINT}` "
        f"(files under {DEFAULT_ROOT}), or pass data.root=<folder with the four idx files>")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not) -> uint8 array of its shape; clear errors for bad files."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"{path}: cannot read ({type(e).__name__}: {e}); reinstall it ({INSTALL_HINT})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    if raw[2] != UBYTE:
        raise ValueError(f"{path}: element type 0x{raw[2]:02x}, expected unsigned bytes (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header]) if len(raw) >= header else ()
    expected = header + int(np.prod(shape)) if shape else -1
    if len(raw) != expected:
        raise ValueError(f"{path}: {len(raw)} bytes, but its header {tuple(shape)} needs {expected}: the file "
                         f"is truncated or corrupt; reinstall it ({INSTALL_HINT})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """uint8 array -> idx file (gzipped when the name ends in .gz), written atomically."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, UBYTE, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path = Path(path)
    # mtime=0: the same images give the same bytes, so a rebuilt subset is unchanged in git
    data = gzip.compress(raw, mtime=0) if path.suffix == ".gz" else raw
    atomic_write_bytes(path, lambda f: f.write(data))
    return path


class FashionMnist:
    """One split of Fashion-MNIST in memory (47 MB for train): `len`, `labels` (uint8 array),
    `grey(i)` (28x28 uint8), `padded(i)` (32x32 uint8) and `rgb(i, size)` (PIL RGB: 3 equal
    channels, padded to 32, optionally upsampled to `size`). `indices` keeps a subset, in the
    order given."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, split: str = "train",
                 indices: list[int] | np.ndarray | None = None):
        self.root, self.split = Path(root).expanduser(), split
        images = read_idx(idx_path(root, split, "images"))
        labels = read_idx(idx_path(root, split, "labels"))
        if images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
            raise ValueError(f"{idx_path(root, split, 'images')}: images of shape {images.shape[1:]}, expected "
                             f"({SIDE}, {SIDE})")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{self.root}: {len(images)} images but {len(labels)} labels in the {split} split")
        if len(labels) and int(labels.max()) >= len(CLASSES):
            raise ValueError(f"{self.root}: label {int(labels.max())} in the {split} split; Fashion-MNIST has "
                             f"{len(CLASSES)} classes (0..{len(CLASSES) - 1})")
        if indices is not None:
            indices = np.asarray(indices, dtype=np.int64)
            if len(indices) and (indices.min() < 0 or indices.max() >= len(images)):
                raise ValueError(f"indices out of range for the {len(images)} images of the {split} split")
            images, labels = images[indices], labels[indices]
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def grey(self, index: int) -> np.ndarray:
        return self.images[index]

    def padded(self, index: int) -> np.ndarray:
        """32x32 uint8: the image padded with background (what the apps and the shards start from)."""
        pad = (PADDED - SIDE) // 2
        return np.pad(self.images[index], pad)  # 0 = Fashion-MNIST's background

    def rgb(self, index: int, size: int | None = None) -> Image.Image:
        """3 equal channels, padded with background to 32x32; resized (bicubic) to size x size if given."""
        grey = self.padded(index)
        img = Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2))
        return img if size is None or size == PADDED else img.resize((size, size), Image.BICUBIC)


def class_balanced_indices(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` indices of every class, in file order (a deterministic subset)."""
    picked = [np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]
    short = [CLASSES[c] for c, p in enumerate(picked) if len(p) < per_class]
    if short:
        raise ValueError(f"fewer than {per_class} images of class(es) {short}")
    return np.sort(np.concatenate(picked))


def labelled_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A class-balanced random `fraction` of the indices (at least one per class), from `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        count = max(1, round(len(members) * fraction))
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


class FashionMnistSource:
    """A FashionMnist split as a source of sparse_mae.data.dataset: `read(i)` -> (32px RGB
    image, label); the transform does the upsampling (crop and resize in one step)."""

    REPAIR = f"reinstall the files ({INSTALL_HINT})"

    def __init__(self, split: FashionMnist):
        self.split = split
        self.classes = list(CLASSES)
        self.empty_files: list = []

    def __len__(self) -> int:
        return len(self.split)

    def describe(self) -> str:
        return f"the {len(self.split)} Fashion-MNIST {self.split.split} images in {self.split.root}"

    def name(self, i: int) -> str:
        return f"Fashion-MNIST {self.split.split} image {i} in {self.split.root}"

    def read(self, i: int):
        return self.split.rgb(i), int(self.split.labels[i])

    def check(self) -> None:
        if len(self.split) == 0:
            raise ValueError(f"{self.describe()}: no images; {self.REPAIR}")


def fashion_mnist_split(data_cfg, split: str) -> FashionMnistSource:
    """The Fashion-MNIST data option of the apps: split 'pretrain' (the first data.num_images
    training images), 'train' (a class-balanced data.label_fraction of them, from
    data.label_seed) or 'val' (the first data.num_val test images). Ranges: config's schema."""
    if split == "val":
        source = FashionMnist(data_cfg.root, "test")
        if data_cfg.get("num_val") is not None:
            source = FashionMnist(data_cfg.root, "test", indices=np.arange(min(data_cfg.num_val, len(source))))
        return FashionMnistSource(source)
    source = FashionMnist(data_cfg.root, "train")
    if split == "pretrain" and data_cfg.get("num_images") is not None:
        source.images, source.labels = source.images[:data_cfg.num_images], source.labels[:data_cfg.num_images]
    elif split == "train" and data_cfg.get("label_fraction", 1.0) < 1.0:
        keep = labelled_fraction(source.labels, data_cfg.label_fraction, data_cfg.label_seed)
        source.images, source.labels = source.images[keep], source.labels[keep]
    return FashionMnistSource(source)
