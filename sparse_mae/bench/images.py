"""Photo-like JPEGs of a given size, for the loader benchmark and the data tests: a built-in
pattern (sparse_mae.data.builtin) scaled up, with sensor-like noise so the files compress (and
decode) about as a camera JPEG of that size does (a flat picture would decode unrealistically fast)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sparse_mae.data.builtin import CLASSES, draw_image


def photo(index: int, width: int, height: int, seed: int = 0) -> tuple[Image.Image, int]:
    img, label = draw_image(index, 128, seed)
    arr = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    big = np.asarray(Image.fromarray(arr).resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = np.random.default_rng(seed * 1_000_003 + index).normal(0, 6, big.shape)
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8)), label


def write_jpegs(folder: str | Path, count: int, width: int, height: int, labelled: bool = False,
                seed: int = 0, quality: int = 90) -> list[Path]:
    """`count` JPEGs under folder (in class sub-folders when labelled) -> their paths."""
    folder = Path(folder)
    paths = []
    for i in range(count):
        img, label = photo(i, width, height, seed)
        where = folder / CLASSES[label] if labelled else folder
        where.mkdir(parents=True, exist_ok=True)
        path = where / f"img_{i:06d}.jpg"
        img.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths
