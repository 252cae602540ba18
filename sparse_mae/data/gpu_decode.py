"""`data.decode=gpu`: shard JPEGs decoded and augmented on the training GPU (nvjpeg through torchvision).

What runs where:

- the DataLoader's workers (SeededDataset of a ShardSource with a `JpegCrop` transform) read a
  sample's bytes and verify its checksum (a damaged sample is skipped and counted as with data.decode=cpu), read
  the JPEG header for the image size, and draw the crop box and flip from the sample's seed
  with the same functions as the CPU path (decode.train_crop, transforms.centre_crop_box). An
  item is {"jpeg": uint8 (bytes,), "box": float64 (4,), "flip": bool, "size" (of the crop),
  "index", "seed", "skipped"} (+ "label"); `collate` keeps the byte tensors as a list (they differ in length).
- the training process (`decode_batch`, called by sparse_mae.data.loader.to_model)
  decodes the batch's JPEGs in one nvjpeg call onto the device, cuts each image's box,
  resizes it to size x size (bicubic with antialias: torch's port of Pillow's resampling),
  flips it, and stacks uint8 (N, 3, size, size); transforms.model_input then normalises it
  exactly as for data.decode=cpu.

A sample nvjpeg refuses is decoded by the CPU path for that one sample
(SeededDataset.decode_on_cpu): its bytes passed the checksum, so they are what `prepare` wrote
(Pillow's baseline JPEGs), which Pillow reads; nvjpeg refuses a few valid kinds of JPEG, so
skipping them would drop good images. The CPU path keeps the image with the same crop, keeps
the batch the sampler chose, and skips-and-counts exactly as data.decode=cpu when Pillow
cannot decode it either (a replacement drawn from the sample's seed, with its label, "skipped" 1).
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from sparse_mae.data.decode import crop_resize, image_size

Decoder = Callable[[Sequence[torch.Tensor], torch.device], list]


def require_gpu_decode() -> None:
    """data.decode=gpu needs a CUDA GPU and torchvision: say so at start, never fall back."""
    from sparse_mae.errors import ConfigError

    if not torch.cuda.is_available():
        raise ConfigError("data.decode=gpu decodes the JPEGs on a CUDA GPU (nvjpeg) and this machine has none "
                          "(torch.cuda.is_available() is False); use data.decode=cpu, or run on a CUDA machine "
                          "with torchvision (`make setup` installs it with the CUDA torch)")
    try:
        import torchvision.io  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a CPU-only torchvision fails with other errors than ImportError
        raise ConfigError(f"data.decode=gpu needs torchvision for nvjpeg, which does not import here "
                          f"({type(e).__name__}: {e}); run `make setup` on this CUDA machine (it installs "
                          f"torchvision==0.28.0 with the CUDA torch), or use data.decode=cpu") from e


def nvjpeg_decode(jpegs: Sequence[torch.Tensor], device: torch.device) -> list:
    """JPEG byte tensors -> uint8 (3, H, W) RGB images on `device`, one batched nvjpeg call;
    where the batch fails, one call per image, and None for an image nvjpeg refuses."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device))
    except (RuntimeError, ValueError):
        out = []
        for data in jpegs:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except (RuntimeError, ValueError):
                out.append(None)
        return out


def pil_decode(jpegs: Sequence[torch.Tensor], device: torch.device) -> list:
    """The same contract decoded by Pillow on the CPU (tests stand it in for nvjpeg)."""
    out = []
    for data in jpegs:
        try:
            img = Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB")
        except (OSError, ValueError, SyntaxError):
            out.append(None)
            continue
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().to(device))
    return out


class JpegCrop:
    """The worker's share of data.decode=gpu: JPEG bytes -> {"jpeg", "box", "flip", "size"}, the box
    (on the full-size image) and flip drawn by `crop(width, height, seed)` of the CPU
    transform it stands for (FastTrainTransform or FastEvalTransform)."""

    def __init__(self, cpu_transform):
        self.cpu_transform, self.size = cpu_transform, cpu_transform.size

    def __call__(self, data: bytes, seed: int) -> dict:
        width, height = image_size(data)  # the header only
        box, flip = self.cpu_transform.crop(width, height, seed)
        return {"jpeg": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "box": torch.tensor(box, dtype=torch.float64), "flip": bool(flip), "size": self.size}


def collate(items: list[dict]) -> dict:
    """default_collate, except that JPEG byte tensors (of different lengths) stay a list."""
    if "jpeg" not in items[0]:
        return default_collate(items)
    batch = default_collate([{k: v for k, v in it.items() if k != "jpeg"} for it in items])
    batch["jpeg"] = [it["jpeg"] for it in items]
    return batch


def decode_batch(batch: dict, device: torch.device, dataset, decode: Decoder | None = None) -> dict:
    """A loader batch with its images as uint8 (N, 3, size, size) on `device` in "image".

    Batches of decoded images (data.decode=cpu) pass unchanged. For data.decode=gpu batches
    the JPEGs are decoded by `decode` (default nvjpeg on `device`, a CUDA device), cropped,
    resized and flipped there; a sample `decode` refuses goes through the dataset's CPU path,
    which may replace it (drawn from its seed, as the worker draws) and then updates its "label" and "skipped"."""
    if "jpeg" not in batch:
        return batch
    if decode is None:
        if device.type != "cuda":
            raise ValueError(f"data.decode=gpu decodes on the training GPU, but this run is on {device}; "
                             f"use device=cuda (or auto on a CUDA machine), or data.decode=cpu")
        decode = nvjpeg_decode
    images = decode(batch["jpeg"], device)
    out = []
    for i, image in enumerate(images):
        if image is None:
            image, label, replaced = dataset.decode_on_cpu(int(batch["index"][i]), int(batch["seed"][i]))
            out.append(image.to(device))
            batch["skipped"][i] = int(replaced)
            if label is not None:
                batch["label"][i] = label
            continue
        out.append(crop_resize(image, batch["box"][i].tolist(), bool(batch["flip"][i]), int(batch["size"][i])))
    batch = {k: v for k, v in batch.items() if k not in ("jpeg", "box", "flip", "size")}
    batch["image"] = torch.stack(out)
    return batch
