"""Image folders: every image under a folder (pretraining), or ImageNet-style class folders
(fine-tuning and evaluation).

Bad files never crash a run (pretraining, fine-tuning or evaluation): zero-byte files are
set aside when the folder is scanned; a file that fails to decode is replaced by the next
good image in the list (deterministic, so exact resume still holds), a warning names it
once per worker, and each sample carries the number of files skipped to produce it, so
the training loop counts them and evaluation leaves the replacements out.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from sparse_mae.data.filenames import printable_name

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _folder_id(path: str) -> tuple[int, int] | None:
    """(device, inode) of the real folder behind `path` (symlinks followed); None if unreadable."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def leads_back(path: str, tree: str) -> bool:
    """Whether `path` is a symlink to a place inside the real folder `tree` (reached there under
    its own name already) or above it (a folder that holds the tree)."""
    if not os.path.islink(path):
        return False
    real = os.path.realpath(path)
    return _within(real, tree) or _within(tree, real)


def walk_each_folder_once(root: Path, tree: Path | None = None):
    """os.walk that follows symlinked folders but enters each real folder once.

    Plain `os.walk(followlinks=True)` goes round a symlink loop (`a -> ..`) until the path
    gets too long, listing every file again on each lap. Here a folder already entered, or
    already queued under another name, is skipped, and so is a symlink into `tree` (the whole
    source, `root` by default; its folders are walked under their own names, so a class
    folder never takes another's images) or above it. Sub-folders are taken in name order, so
    which of two names for one folder is kept (the first) does not depend on the file system.
    """
    if tree is not None and leads_back(str(root), os.path.realpath(tree)):  # a class folder that is another's
        return
    tree = os.path.realpath(tree if tree is not None else root)
    seen = {_folder_id(str(root))}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        keep = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            folder = _folder_id(path)
            if folder is not None and folder not in seen and not leads_back(path, tree):
                seen.add(folder)
                keep.append(name)
        dirnames[:] = keep  # os.walk descends only into what is left here
        yield dirpath, filenames


def find_images(root: str | os.PathLike, tree: str | os.PathLike | None = None) -> tuple[list[Path], list[Path]]:
    """-> (image files sorted by path, zero-byte image files). Follows symlinked folders,
    each real folder once, so a symlink loop neither hangs the scan nor repeats files; a
    symlink back into `tree` (the source `root` is part of: a class folder's parent) or above
    it is not followed, nor a symlinked image of the tree (listed under its own name)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data.root={root} does not exist; point data.root at a folder of images "
                                f"(or use data=builtin for the built-in images)")
    if not root.is_dir():
        raise NotADirectoryError(f"data.root={root} is not a folder")
    real_tree = os.path.realpath(tree if tree is not None else root)
    files, empty = [], []
    for dirpath, names in walk_each_folder_once(root, tree):
        for name in names:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                p = Path(dirpath) / name
                if leads_back(str(p), real_tree) and os.path.realpath(p).lower().endswith(IMAGE_EXTENSIONS):
                    continue
                try:
                    (files if p.stat().st_size > 0 else empty).append(p)
                except OSError:  # a dangling symlink
                    empty.append(p)
    if not files:
        raise ValueError(f"data.root={root} holds no readable images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                         f"recursively{f'; {len(empty)} zero-byte files skipped' if empty else ''})")
    return sorted(files), sorted(empty)


def load_rgb(path: Path) -> Image.Image:
    """Decode any mode (L, P, RGBA, CMYK, I;16, ...) to RGB, upright as its EXIF orientation
    says (a phone's portrait photo is stored sideways); raises on a bad file."""
    with Image.open(path) as img:
        img.load()
        rgb = upright_rgb(img)
        return rgb.copy() if rgb is img else rgb  # detached from the file being closed


def upright_rgb(img: Image.Image) -> Image.Image:
    """A loaded image as RGB, turned upright as its EXIF orientation says (img itself where
    neither changes anything)."""
    return as_rgb(ImageOps.exif_transpose(img))


def as_rgb(img: Image.Image) -> Image.Image:
    """A loaded image of any mode as RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # >8-bit grayscale: rescale first
        img = img.point(lambda v: v / 256) if img.mode.startswith("I;16") else img
        img = img.convert("L")
    return img.convert("RGB")


MAX_NAMED_BAD_FILES = 5  # per process: a folder of thousands of bad files printed thousands of warnings


class ImageFilesDataset(Dataset):
    """A list of image files read under one bad-file policy, shared by every app's data: a
    file that fails to decode is replaced by the next readable file of the list
    (deterministic, so exact resume still holds), a warning names it once per process, and
    the item's "skipped" says how many files were passed over to produce it."""

    def __init__(self, root: str | os.PathLike, files: list[Path], transform):
        self.root = Path(root)
        self.files = files
        self.transform = transform
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.files)

    def read(self, index: int) -> tuple[Image.Image, int, int]:
        """-> (RGB image, index of the file actually read, files skipped to reach it)."""
        for skipped in range(len(self.files)):
            at = (index + skipped) % len(self.files)
            path = self.files[at]
            try:
                return load_rgb(path), at, skipped
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                if path not in self._warned:
                    self._warned.add(path)
                    if len(self._warned) <= MAX_NAMED_BAD_FILES:
                        warnings.warn(f"skipping unreadable image {printable_name(path)}: {type(e).__name__}: {e}",
                                      stacklevel=1)
                    if len(self._warned) == MAX_NAMED_BAD_FILES:
                        warnings.warn(f"more unreadable images under {self.root} are skipped without a warning "
                                      f"each (counted in skipped_files)", stacklevel=1)
        raise ValueError(f"none of the {len(self.files)} image files under {self.root} can be decoded (the first: "
                         f"{self.files[0]}); check the folder with `python -m sparse_mae.data.imagefolder "
                         f"{self.root}` or point data.root at the images")


class ImageFolderDataset(ImageFilesDataset):
    """Every image under `root` (no labels). Items are requested as `(index, seed)` (see
    train.sampler) and returned as `{"image": (3, size, size) float, "seed", "skipped"}`."""

    def __init__(self, root: str | os.PathLike, transform):
        files, self.empty_files = find_images(root)
        super().__init__(root, files, transform)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        img, _, skipped = self.read(index)
        return {"image": self.transform(img, seed), "seed": seed, "skipped": skipped}


class LabelledImageFolderDataset(ImageFilesDataset):
    """root/<class>/**/*.jpg -> {"image", "label", "seed", "skipped"}; classes sorted by name
    (or given, so val uses train's class indices). A replaced unreadable file brings its
    replacement's label along."""

    def __init__(self, root: str | os.PathLike, transform, classes: list[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} does not exist; data.root needs train/ and val/ sub-folders "
                                    f"of class folders (root/train/<class>/*.jpg)")
        real_root = os.path.realpath(root)  # a symlink to another class folder (or above) is not a class
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not leads_back(str(p), real_root))
        self.classes = list(classes) if classes is not None else found
        extra = sorted(set(found) - set(self.classes))
        if extra:
            raise ValueError(f"{root} has class folders {extra} that the training split lacks")
        if not self.classes:
            raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/*.jpg)")
        files, self.labels, self.empty_files = [], [], []
        for label, name in enumerate(self.classes):
            if (root / name).is_dir():
                try:
                    found_files, empty = find_images(root / name, tree=root)
                except ValueError:  # a class folder without images
                    if classes is None:  # the training split defines the classes: one that cannot be learnt
                        raise ValueError(
                            f"class folder {root / name} has no images: it would be class {label} of "
                            f"{len(self.classes)}, one the model never sees. Add images or remove the folder"
                        ) from None
                    continue  # val may lack a class
                files += found_files
                self.labels += [label] * len(found_files)
                self.empty_files += empty
        if not files:
            raise ValueError(f"no images under {root}/<class>/")
        super().__init__(root, files, transform)

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return list(zip(self.files, self.labels))

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, item)
        img, at, skipped = self.read(index)
        return {"image": self.transform(img, seed), "label": self.labels[at], "seed": seed, "skipped": skipped}


def count_unreadable(files: list[Path]) -> int:
    """Decode every file once (slow: for reports and tests, not the training loop)."""
    bad = 0
    for p in files:
        try:
            load_rgb(p)
        except Exception:  # noqa: BLE001 - counting every kind of failure is the point
            bad += 1
    return bad


def _main() -> int:  # `python -m sparse_mae.data.imagefolder DIR`: check a folder before training
    files, empty = find_images(sys.argv[1])
    bad = count_unreadable(files)
    print(f"{len(files)} image files, {len(empty)} zero-byte, {bad} unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
