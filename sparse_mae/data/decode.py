"""Fast JPEG decode + augmentation for shards: JPEG bytes -> uint8 (3, size, size).

The crop box is drawn exactly as today's TrainTransform draws it (random_resized_crop_box on
the image's full size, then the flip, from the same per-sample seed); only the pixels are
made more cheaply:

- libjpeg's DCT scaling (PIL's `Image.draft`) decodes at 1/2, 1/4 or 1/8 of the size where
  the crop box, so reduced, still has at least `size` pixels on each side: a 1600x1200 photo
  whose box is 900 px wide decodes at 400x300 when the crop is 224;
- the resize reads only the box (crop before resize);
- the result stays uint8 (4x smaller through the DataLoader's queues and pinned memory) and is
  normalised on the training device by `sparse_mae.data.transforms.model_input`.

Measured in docs/data.md; the distribution test is tests/test_shards.py.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from sparse_mae.data.transforms import random_resized_crop_box


def open_reduced(data: bytes | Image.Image, width_needed: float, height_needed: float) -> tuple[Image.Image, float]:
    """Decode JPEG bytes (or an image opened but not yet loaded) at the smallest DCT scale at
    which the full image is still at least (width_needed, height_needed) -> (RGB image, factor
    from full-size to decoded coordinates)."""
    img = Image.open(io.BytesIO(data)) if isinstance(data, (bytes, bytearray, memoryview)) else data
    full_w, full_h = img.size
    if img.format == "JPEG":
        img.draft("RGB", (max(1, math.ceil(width_needed)), max(1, math.ceil(height_needed))))
    img = img.convert("RGB") if img.mode != "RGB" else img
    img.load()
    return img, img.size[0] / full_w


def train_crop(width: int, height: int, seed: int, scale: tuple[float, float], ratio: tuple[float, float],
               hflip: float) -> tuple[tuple[int, int, int, int], bool]:
    """The random crop box (on the full-size image) and flip of one sample, from its seed:
    what FastTrainTransform crops on the loader's cores and data.decode=gpu crops on the GPU
    (sparse_mae/data/gpu_decode.py), so both paths cut the same regions from the same seeds."""
    g = torch.Generator().manual_seed(seed)
    box = random_resized_crop_box(width, height, scale, ratio, g)
    return box, float(torch.rand(1, generator=g)) < hflip


def centre_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region of the full-size image that becomes the eval crop: the shorter side resized
    to `size`, then the centred size x size square, in full-size pixels (fractional)."""
    s = size / min(width, height)
    w, h = max(size, round(width * s)), max(size, round(height * s))
    left, top = (w - size) // 2, (h - size) // 2
    return tuple(v / s for v in (left, top, left + size, top + size))


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class FastTrainTransform:
    """RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip on JPEG bytes -> uint8."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def crop(self, width: int, height: int, seed: int) -> tuple[tuple[int, int, int, int], bool]:
        return train_crop(width, height, seed, self.scale, self.ratio, self.hflip)

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))  # the header only: pixels are decoded below
        width, height = img.size
        (left, top, right, bottom), flip = self.crop(width, height, seed)
        # the box must keep >= size pixels per side after the reduction
        img, f = open_reduced(img, width * self.size / (right - left), height * self.size / (bottom - top))
        box = (left * f, top * f, min(right * f, img.width), min(bottom * f, img.height))
        out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_uint8_chw(out)


class FastEvalTransform:
    """Resize the shorter side to `size` (bicubic) and centre-crop, from JPEG bytes -> uint8."""

    def __init__(self, size: int):
        self.size = size

    def crop(self, width: int, height: int, seed: int = 0) -> tuple[tuple[float, float, float, float], bool]:
        return centre_crop_box(width, height, self.size), False

    def __call__(self, data: bytes, seed: int = 0) -> torch.Tensor:
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        s = self.size / min(width, height)
        img, f = open_reduced(img, width * s, height * s)
        box = tuple(v * f for v in self.crop(width, height)[0])
        box = (box[0], box[1], min(box[2], img.width), min(box[3], img.height))
        return to_uint8_chw(img.resize((self.size, self.size), Image.BICUBIC, box=box))
