"""Image augmentation with Pillow + torch only (no torchvision on these registries).

Every random draw comes from an explicit `torch.Generator`, so one integer seed per
sample fixes its crop and flip regardless of DataLoader workers or process count.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def mean_std(dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (3, 1, 1): they broadcast over (3, H, W) and (N, 3, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device).view(3, 1, 1)
    return mean, torch.tensor(IMAGENET_STD, dtype=dtype, device=device).view(3, 1, 1)


def normalize(imgs: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> ImageNet-normalised."""
    mean, std = mean_std(imgs.dtype, imgs.device)
    return (imgs - mean) / std


def unnormalize(imgs: torch.Tensor) -> torch.Tensor:
    """The inverse of `normalize`."""
    mean, std = mean_std(imgs.dtype, imgs.device)
    return imgs * std + mean


def random_resized_crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                            g: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box search -> (left, top, right, bottom).

    Ten tries at a random area fraction in `scale` and aspect ratio (log-uniform in
    `ratio`); then the largest centred crop whose aspect is within `ratio`. Works for any
    image size down to 1x1 (the box is then the whole image, resized up).
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=g)))
        aspect = math.exp(log_lo + (log_hi - log_lo) * float(torch.rand(1, generator=g)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_normalized_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32, ImageNet-normalised."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    mean, std = mean_std()
    return (x - mean) / std


class TrainTransform:
    """RandomResizedCrop(size, scale, ratio (3/4, 4/3), bicubic) + horizontal flip + normalise."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.2, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5):
        if size <= 0:
            raise ValueError(f"crop size must be > 0, got {size}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip

    def __call__(self, img: Image.Image, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        box = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, g)
        out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if float(torch.rand(1, generator=g)) < self.hflip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return to_normalized_tensor(out)


class EvalTransform:
    """Resize the shorter side to `size` (bicubic), centre crop size x size, normalise.

    Done as one resize of the source region that becomes the crop, so memory follows the
    output: resizing a 1 x 40000 image whole first made a 224 x 8960000 one (8.4 GB)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image, seed: int = 0) -> torch.Tensor:
        box = centre_crop_box(img.width, img.height, self.size)
        return to_normalized_tensor(img.resize((self.size, self.size), Image.BICUBIC, box=box))


def centre_crop_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The region of the full-size image that becomes the eval crop: the shorter side resized
    to `size` (each side rounded), then the centred size x size square, in full-size pixels
    (fractional). Every eval path crops this box: EvalTransform, the shards' fast decode."""
    s = size / min(width, height)
    w, h = max(size, round(width * s)), max(size, round(height * s))
    left, top = (w - size) // 2, (h - size) // 2
    sx, sy = width / w, height / h  # resized -> source pixels
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def tensor_to_pil(img: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB PIL image."""
    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr)  # uint8 (H, W, 3) is RGB


def model_input(images: torch.Tensor) -> torch.Tensor:
    """A batch as the models take it: uint8 (N, 3, H, W) (shards: decoded and augmented on the
    loader's cores, normalised here on the training device) -> ImageNet-normalised float32, the
    same arithmetic as to_normalized_tensor; a float batch is already normalised."""
    if images.dtype != torch.uint8:
        return images
    mean, std = mean_std(device=images.device)
    return (images.to(torch.float32) / 255.0 - mean) / std
