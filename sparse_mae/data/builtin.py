"""Built-in data that needs no download: procedurally drawn, labelled RGB images.

Each class is a kind of pattern (discs, stripes, checkers, ...) with random colours,
positions and scales, drawn deterministically from (seed, index). The structure is
learnable, so reconstruction loss and classification accuracy both move in short runs.
"""
from __future__ import annotations

import math

import torch

from sparse_mae.data.transforms import tensor_to_pil

CLASSES = ("disc", "square", "stripes_h", "stripes_v", "checker", "ring", "gradient", "blobs")


def _rand(g: torch.Generator, *shape) -> torch.Tensor:
    return torch.rand(*shape, generator=g)


def draw_image(index: int, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, int]:
    """-> (image (3, size, size) float in [0, 1], label)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    label = index % len(CLASSES)
    kind = CLASSES[label]
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    bg, fg = _rand(g, 3, 1, 1), _rand(g, 3, 1, 1)
    cy, cx = 0.25 + 0.5 * _rand(g, 2)
    r = 0.12 + 0.25 * float(_rand(g, 1))
    freq = 3 + 6 * float(_rand(g, 1))
    phase = 2 * math.pi * float(_rand(g, 1))
    if kind == "disc":
        m = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).float()
    elif kind == "square":
        m = (((yy - cy).abs() < r) & ((xx - cx).abs() < r)).float()
    elif kind == "stripes_h":
        m = (torch.sin(2 * math.pi * freq * yy + phase) > 0).float()
    elif kind == "stripes_v":
        m = (torch.sin(2 * math.pi * freq * xx + phase) > 0).float()
    elif kind == "checker":
        m = ((torch.sin(2 * math.pi * freq * yy + phase) > 0) ^ (torch.sin(2 * math.pi * freq * xx) > 0)).float()
    elif kind == "ring":
        d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
        m = ((d > r * 0.6) & (d < r)).float()
    elif kind == "gradient":
        angle = 2 * math.pi * float(_rand(g, 1))
        m = (math.cos(angle) * (xx - 0.5) + math.sin(angle) * (yy - 0.5) + 0.5).clamp(0, 1)
    else:  # blobs: a few soft gaussians
        m = torch.zeros(size, size)
        for _ in range(3):
            by, bx = _rand(g, 2)
            m = m + torch.exp(-((yy - by) ** 2 + (xx - bx) ** 2) / (2 * (0.08 + 0.1 * float(_rand(g, 1))) ** 2))
        m = m.clamp(0, 1)
    img = bg * (1 - m) + fg * m
    img = img + 0.03 * torch.randn(3, size, size, generator=g)  # a little texture
    return img.clamp(0, 1), label


def builtin_batch(n: int, size: int = 64, seed: int = 0, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (images (n, 3, size, size) in [0, 1], labels (n,))."""
    items = [draw_image(start + i, size, seed) for i in range(n)]
    return torch.stack([im for im, _ in items]), torch.tensor([lb for _, lb in items])


class BuiltinSource:
    """`num_images` procedural images (drawn at `draw_size` from `seed`) as a source of
    sparse_mae.data.dataset, for `data=builtin`: drawn, so never damaged."""

    REPAIR = "(drawn images cannot be damaged)"

    def __init__(self, num_images: int, draw_size: int, seed: int = 0):
        if num_images <= 0:
            raise ValueError(f"data.num_images must be > 0, got {num_images}")
        if draw_size <= 0:
            raise ValueError(f"data.draw_size must be > 0, got {draw_size}")
        self.num_images, self.draw_size, self.seed = num_images, draw_size, seed
        self.classes = list(CLASSES)
        self.empty_files: list = []

    def __len__(self) -> int:
        return self.num_images

    def describe(self) -> str:
        return f"the {self.num_images} built-in images"

    def name(self, i: int) -> str:
        return f"built-in image {i} (seed {self.seed})"

    def read(self, i: int):
        img, label = draw_image(i, self.draw_size, self.seed)
        return tensor_to_pil(img), label

    def check(self) -> None:
        """Drawn on demand: nothing to check."""
