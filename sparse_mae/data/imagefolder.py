"""Image folders: every image under a folder (pretraining), or ImageNet-style class folders
(fine-tuning and evaluation).

Bad files never crash a run (pretraining, fine-tuning or evaluation): zero-byte files are
set aside when the folder is scanned; a file that fails to decode is skipped, replaced and
counted by the one damaged-sample policy of sparse_mae.data.dataset.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image, ImageOps

from sparse_mae.data.dataset import DECODE_ERRORS
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


class ImageFilesSource:
    """A list of image files (with a label each, or none) as a source of
    sparse_mae.data.dataset: `read(i)` -> (RGB image, label) or why file i cannot be decoded."""

    REPAIR = "check the folder with `python -m sparse_mae.data.imagefolder <folder>` or point data.root at the images"

    def __init__(self, root: str | os.PathLike, files: list[Path], labels: list[int] | None = None,
                 classes: list[str] | None = None, empty_files: list[Path] | None = None):
        self.root, self.files, self.labels, self.classes = Path(root), files, labels, classes
        self.empty_files = empty_files or []

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return f"the {len(self.files)} image files under {self.root}"

    def name(self, i: int) -> str:
        return f"image {printable_name(self.files[i])}"

    def read(self, i: int) -> tuple[Image.Image, int] | str:
        try:
            image = load_rgb(self.files[i])
        except DECODE_ERRORS as e:
            return f"{type(e).__name__}: {e}"
        return image, (self.labels[i] if self.labels is not None else -1)

    def check(self) -> None:
        """Opening the folder checked it (files found; class folders agree): nothing left to check."""

    @property
    def samples(self) -> list[tuple[Path, int]]:
        return list(zip(self.files, self.labels or []))


def image_folder(root: str | os.PathLike) -> ImageFilesSource:
    """Every image under `root`, unlabelled."""
    files, empty = find_images(root)
    return ImageFilesSource(root, files, empty_files=empty)


def labelled_image_folder(root: str | os.PathLike, classes: list[str] | None = None) -> ImageFilesSource:
    """root/<class>/**/*.jpg; classes sorted by name, or given (so val uses train's class indices)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; data.root needs train/ and val/ sub-folders "
                                f"of class folders (root/train/<class>/*.jpg)")
    real_root = os.path.realpath(root)  # a symlink to another class folder (or above) is not a class
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not leads_back(str(p), real_root))
    defines_classes = classes is None  # the training split: each class must have images
    classes = list(classes) if classes is not None else found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{root} has class folders {extra} that the training split lacks")
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected {root}/<class>/*.jpg)")
    files, labels, empty_files = [], [], []
    for label, name in enumerate(classes):
        if (root / name).is_dir():
            try:
                found_files, empty = find_images(root / name, tree=root)
            except ValueError:  # a class folder without images
                if defines_classes:  # a class that cannot be learnt
                    raise ValueError(
                        f"class folder {root / name} has no images: it would be class {label} of "
                        f"{len(classes)}, one the model never sees. Add images or remove the folder"
                    ) from None
                continue  # val may lack a class
            files += found_files
            labels += [label] * len(found_files)
            empty_files += empty
    if not files:
        raise ValueError(f"no images under {root}/<class>/")
    return ImageFilesSource(root, files, labels, classes, empty_files)


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
