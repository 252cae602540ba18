"""The reconstruction picture: original | masked input | prediction | prediction with the
visible patches pasted back, one row per image."""
from __future__ import annotations

import io

import torch
from PIL import Image

from sparse_mae.data.transforms import tensor_to_pil, unnormalize
from sparse_mae.io import atomic_write_bytes

GAP = 2  # pixels between tiles


@torch.no_grad()
def reconstruction_panels(model, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """FCMAE `model` (unwrapped), normalised imgs (N, 3, H, W), mask (N, L) ->
    (N, 4, 3, H, W) in [0, 1]: original, masked input (removed patches grey), prediction,
    prediction with the visible patches of the original pasted back."""
    was_training = model.training
    model.eval()
    try:
        _, pred, mask = model(imgs, mask=mask)
    finally:
        model.train(was_training)
    pred = pred.float()
    if model.norm_pix_loss:  # the model predicts per-patch normalised pixels: undo with the target's stats
        target = model.patchify(imgs)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    n, _, h, w = imgs.shape
    p = model.patch_size
    pred_img = model.unpatchify(pred, (h // p, w // p))
    removed = mask.reshape(n, 1, h // p, w // p).repeat_interleave(p, 2).repeat_interleave(p, 3).to(imgs.dtype)
    original = unnormalize(imgs)
    prediction = unnormalize(pred_img)
    masked_input = original * (1 - removed) + 0.5 * removed
    pasted = original * (1 - removed) + prediction * removed
    return torch.stack([original, masked_input, prediction, pasted], dim=1).clamp(0, 1).cpu()


def panels_to_image(panels: torch.Tensor) -> Image.Image:
    """(N, K, 3, H, W) in [0, 1] -> one RGB image, N rows x K columns, white gaps."""
    n, k, _, h, w = panels.shape
    canvas = torch.ones(3, n * h + (n + 1) * GAP, k * w + (k + 1) * GAP)
    for i in range(n):
        for j in range(k):
            y, x = GAP + i * (h + GAP), GAP + j * (w + GAP)
            canvas[:, y:y + h, x:x + w] = panels[i, j]
    return tensor_to_pil(canvas)


def save_reconstruction(model, imgs: torch.Tensor, mask: torch.Tensor, *paths) -> Image.Image:
    """Encode the picture once and write it to every path atomically (a viewer, or a run
    resumed after a kill, never sees a half-written PNG)."""
    image = panels_to_image(reconstruction_panels(model, imgs, mask))
    png = io.BytesIO()
    image.save(png, format="PNG")
    for path in paths:
        atomic_write_bytes(path, lambda f: f.write(png.getvalue()))
    return image
