"""Fast JPEG decode + augmentation for shards: JPEG bytes -> uint8 (3, size, size).

The crop box is drawn exactly as today's TrainTransform draws it (random_resized_crop_box on
the image's full size, then the flip, from the same per-sample seed); only the pixels are
made more cheaply:

- libjpeg-turbo through simplejpeg (the header in microseconds, the pixels straight into a
  numpy array) with its DCT scaling, which decodes at 1/2, 1/4 or 1/8 of the size where
  the crop box, so reduced, still has at least `size` pixels on each side: a 1600x1200 photo
  whose box is 900 px wide decodes at 400x300 when the crop is 224;
- the resize reads only the box (crop before resize); a box of whole pixels (no DCT
  reduction) in torch's vectorised uint8 bicubic resampler with antialias (3x faster than
  Pillow's, the same pixels to 0.01 grey levels; the `crop_resize` data.decode=gpu runs on
  the GPU), a fractional box in Pillow's, which resamples it exactly;
- the result stays uint8 (4x smaller through the DataLoader's queues and pinned memory) and is
  normalised on the training device by `sparse_mae.data.transforms.model_input`.

Measured in docs/data.md; the distribution test is tests/test_shards.py.
"""
from __future__ import annotations

import io
import math
from typing import Sequence

import numpy as np
import simplejpeg
import torch
from PIL import Image

from sparse_mae.data.transforms import centre_crop_box, random_resized_crop_box


JPEG_START = b"\xff\xd8"  # SOI: shards hold JPEGs (prepare) or, for lossless sources, PNGs


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the header: libjpeg-turbo's for a JPEG (5 us; Pillow parses the
    markers in Python, 0.5 ms), Pillow's otherwise. Refuses what Pillow would call a
    decompression bomb, as Pillow's decode would."""
    if data[:2] == JPEG_START:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        Image._decompression_bomb_check((width, height))
        return width, height
    with Image.open(io.BytesIO(data)) as img:
        return img.size


def decode_reduced(data: bytes, width_needed: float, height_needed: float,
                   size: tuple[int, int] | None = None) -> tuple[np.ndarray, float]:
    """Decode to RGB at the smallest DCT scale (1/2, 1/4, 1/8: JPEGs only) at which the full
    image is still at least (width_needed, height_needed) -> (uint8 (H, W, 3) array, factor
    from full-size to decoded coordinates). JPEGs go through simplejpeg (libjpeg-turbo into a
    numpy array: the pixels of Pillow's decode, without its Python-side parsing)."""
    width, height = size or image_size(data)  # `size`: the caller read the header already
    if data[:2] == JPEG_START:
        # the power-of-two scales of Pillow's draft: libjpeg-turbo's other M/8 scales would pick
        # e.g. 3/8 or 7/8, whose IDCTs blur the crop further from a full-size decode (3 grey
        # levels at 64 px crops, against under 1)
        k = next(k for k in (8, 4, 2, 1) if k == 1 or (math.ceil(width / k) >= width_needed
                                                     and math.ceil(height / k) >= height_needed))
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(width / k),
                                     min_height=math.ceil(height / k))
    else:
        with Image.open(io.BytesIO(data)) as img:
            rgb = np.array(img.convert("RGB"))
    return rgb, rgb.shape[1] / width


def train_crop(width: int, height: int, seed: int, scale: tuple[float, float], ratio: tuple[float, float],
               hflip: float) -> tuple[tuple[int, int, int, int], bool]:
    """The random crop box (on the full-size image) and flip of one sample, from its seed:
    what FastTrainTransform crops on the loader's cores and data.decode=gpu crops on the GPU
    (sparse_mae/data/gpu_decode.py), so both paths cut the same regions from the same seeds."""
    g = torch.Generator().manual_seed(seed)
    box = random_resized_crop_box(width, height, scale, ratio, g)
    return box, float(torch.rand(1, generator=g)) < hflip


def crop_resize(image: torch.Tensor, box: Sequence[float], flip: bool, size: int) -> torch.Tensor:
    """uint8 (3, H, W) -> the box resized to uint8 (3, size, size), bicubic with antialias
    (torch's port of Pillow's resampling: within 0.01 grey levels of Image.resize(BICUBIC)),
    flipped left-right if `flip`. A fractional box is rounded to whole pixels. On the CPU the
    image stays uint8 and channels-last (an HWC array viewed as CHW): torch's vectorised uint8
    resampler, 3x faster than Pillow's; elsewhere (CUDA) it resamples in float32."""
    height, width = image.shape[-2:]
    left, top, right, bottom = (round(float(v)) for v in box)
    left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
    right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
    region = image[:, top:bottom, left:right].unsqueeze(0)
    if region.device.type != "cpu":
        region = region.to(torch.float32)
    out = torch.nn.functional.interpolate(region, size=(size, size), mode="bicubic", align_corners=False,
                                          antialias=True)[0]
    if flip:
        out = out.flip(-1)
    if out.dtype != torch.uint8:
        out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.contiguous()


def pil_crop_resize(rgb: np.ndarray, box: Sequence[float], flip: bool, size: int) -> torch.Tensor:
    """crop_resize by Pillow, for a box that falls between pixels (a DCT-reduced decode, a
    centre crop): Pillow resamples the exact fractional box, where rounding it would shift
    the crop by up to half a decoded pixel (up to 4 source pixels at 1/8 scale)."""
    img = Image.fromarray(rgb)
    box = (box[0], box[1], min(box[2], img.width), min(box[3], img.height))
    out = img.resize((size, size), Image.BICUBIC, box=box)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return hwc_view(np.array(out)).contiguous()


def hwc_view(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (3, H, W), channels-last in memory (a view, no copy)."""
    return torch.from_numpy(rgb).permute(2, 0, 1)


class FastTrainTransform:
    """RandomResizedCrop(size, scale, ratio, bicubic) + horizontal flip on JPEG bytes -> uint8."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def crop(self, width: int, height: int, seed: int) -> tuple[tuple[int, int, int, int], bool]:
        return train_crop(width, height, seed, self.scale, self.ratio, self.hflip)

    def __call__(self, data: bytes, seed: int) -> torch.Tensor:
        width, height = image_size(data)
        (left, top, right, bottom), flip = self.crop(width, height, seed)
        # the box must keep >= size pixels per side after the reduction
        rgb, f = decode_reduced(data, width * self.size / (right - left), height * self.size / (bottom - top),
                                (width, height))
        if f == 1.0:  # a box of whole pixels: torch's uint8 resampler
            return crop_resize(hwc_view(rgb), (left, top, right, bottom), flip, self.size)
        return pil_crop_resize(rgb, (left * f, top * f, right * f, bottom * f), flip, self.size)


class FastEvalTransform:
    """Resize the shorter side to `size` (bicubic) and centre-crop, from JPEG bytes -> uint8."""

    def __init__(self, size: int):
        self.size = size

    def crop(self, width: int, height: int, seed: int = 0) -> tuple[tuple[float, float, float, float], bool]:
        return centre_crop_box(width, height, self.size), False

    def __call__(self, data: bytes, seed: int = 0) -> torch.Tensor:
        width, height = image_size(data)
        s = self.size / min(width, height)
        rgb, f = decode_reduced(data, width * s, height * s, (width, height))
        return pil_crop_resize(rgb, tuple(v * f for v in self.crop(width, height)[0]), False, self.size)
