"""One dataset for every data format: a *source* reads samples, `SeededDataset` serves them.

A source is one format (built-in drawings: data/builtin.py; an image folder:
data/imagefolder.py; the Fashion-MNIST idx files: data/fashion_mnist.py; a shard folder:
data/shards.py). It knows nothing of seeds, transforms or damage policy; it has

- `len(source)` and `source.classes` (class names, or None for unlabelled images);
- `source.read(i)` -> `(image, label)`: the image as a PIL RGB image or as encoded bytes (what
  the transform takes), the label an int (-1 unlabelled); or a string saying why sample i
  cannot be read (damaged);
- `source.name(i)`: the sample as a user finds it ("image /data/x.jpg", "shard-00003 sample
  7 (cat/x.jpg) of /data/shards"), for the warning that names a damaged sample;
- `source.check()`: raises ValueError naming the fix when the split cannot be trained on at
  all (empty, unlabelled where labels are needed, a file missing or cut short); the factory
  (data/build.py) calls it for every split a run will read, before the first step;
- `source.empty_files`: files set aside when it was opened (zero-byte), for the run's count;
- `source.describe()` ("the 24 image files under /data/val") and `source.REPAIR` (how to
  repair or check it), for the error when no sample at all can be read.

`SeededDataset` applies, in this one place, what every format shares: items requested as
`(index, sample seed)` (train/sampler.py) -> `{"image": transform(image, seed), "label",
"index", "seed", "skipped"}`, and the damaged-sample policy:

- a sample that cannot be read or decoded is replaced by one drawn from its own seed (so a
  good neighbour is not served once per damaged sample before it, and a resumed run draws
  the same replacement), named in a warning once per process (the first
  MAX_NAMED_DAMAGED of them), and the item's "skipped" is 1: it stands for a damaged sample
  (evaluation leaves it out; training counts each damaged sample once, by "index").
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

# what a transform raises on bytes or a file it cannot decode (Pillow's and libjpeg's errors)
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_NAMED_DAMAGED = 5  # per process: a folder of thousands of bad files printed thousands of warnings
RANDOM_DRAWS = 64  # replacement draws before walking the rest in order (only a mostly damaged split needs it)


def replacement_candidates(index: int, seed: int, length: int):
    """The samples tried, in order, in place of damaged sample `index` requested with `seed`:
    RANDOM_DRAWS draws from (seed, index), then every sample from the last draw on (so a
    split with one good sample still finds it, and the search ends)."""
    rng = np.random.default_rng((seed, index))
    draws = rng.integers(0, length, size=min(RANDOM_DRAWS, length))
    yield from (int(d) for d in draws)
    start = int(draws[-1])
    yield from ((start + k) % length for k in range(1, length + 1))


class SeededDataset(Dataset):
    """A source's samples through `transform(image, seed)`, under the damaged-sample policy
    (module docstring). `transform` may return a dict instead of an image (data.decode=gpu's
    JpegCrop: the bytes and crop box, decoded later on the device); then `cpu_transform` is
    the CPU path for a sample the GPU cannot decode (`decode_on_cpu`)."""

    def __init__(self, source, transform: Callable, cpu_transform: Callable | None = None):
        self.source, self.transform, self.cpu_transform = source, transform, cpu_transform
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    @property
    def classes(self) -> list[str] | None:
        return self.source.classes

    @property
    def empty_files(self) -> list:
        return self.source.empty_files

    def check(self) -> None:
        """ValueError naming the fix if this split cannot be trained or evaluated on."""
        self.source.check()

    def __getitem__(self, item) -> dict:
        index, seed = item if isinstance(item, tuple) else (item, item)
        image, label, replaced = self.sample(index, seed, self.transform)
        out = {"image": image} if not isinstance(image, dict) else dict(image)  # data.decode=gpu: a dict
        out |= {"index": index, "seed": seed, "skipped": int(replaced)}
        if self.source.classes is not None:
            out["label"] = label
        return out

    def sample(self, index: int, seed: int, transform: Callable) -> tuple[object, int, bool]:
        """-> (transformed image, label, whether sample `index` was damaged and replaced)."""
        why = self._try(index, seed, transform)
        if not isinstance(why, str):
            return (*why, False)
        self._warn(index, why)
        for at in replacement_candidates(index, seed, len(self.source)):
            got = self._try(at, seed, transform)
            if not isinstance(got, str):
                return (*got, True)
            self._warn(at, got)
        raise ValueError(f"none of {self.source.describe()} can be decoded (the first: {self.source.name(0)}); "
                         f"{self.source.REPAIR}")

    def _try(self, index: int, seed: int, transform: Callable) -> tuple[object, int] | str:
        got = self.source.read(index)
        if isinstance(got, str):
            return got
        image, label = got
        try:
            return transform(image, seed), label
        except DECODE_ERRORS as e:
            return f"undecodable: {type(e).__name__}: {e}"

    def _warn(self, index: int, why: str) -> None:
        if index in self._warned:
            return
        self._warned.add(index)
        if len(self._warned) <= MAX_NAMED_DAMAGED:
            warnings.warn(f"skipping unreadable {self.source.name(index)}: {why}", stacklevel=2)
        if len(self._warned) == MAX_NAMED_DAMAGED:
            warnings.warn("more damaged samples are skipped without a warning each (counted in skipped_files)",
                          stacklevel=2)

    def decode_on_cpu(self, index: int, seed: int) -> tuple[object, int | None, bool]:
        """data.decode=gpu's fallback for a sample the GPU cannot decode: the CPU path for
        requested sample `index` -> (uint8 image, label or None, whether it was replaced). The
        replacement draws are the worker's, so this reaches the sample the worker served, with
        its seed-drawn crop, and goes on drawing only if the CPU cannot decode it either."""
        image, label, replaced = self.sample(index, seed, self.cpu_transform)
        return image, (label if self.source.classes is not None else None), replaced
