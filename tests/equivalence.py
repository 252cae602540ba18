"""Shared harness: does backend X compute the same numbers as the dense_masked reference?

Used by every backend's tests so they all face the same cases. GRN gamma/beta and the
norms' affine params are randomised first: at init GRN is the identity, which would
hide a wrong (e.g. batch-wide) GRN norm.
"""
from __future__ import annotations

import torch

from sparse_mae import create_model

LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6


def randomise_affine(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name or ".norm." in name or "stem.1" in name or "downsample.0" in name:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))


def make_case(variant: str, size, batch: int, mask_ratio: float, seed: int = 0, drop_path_rate: float = 0.0):
    """-> (model on dense_masked, imgs, mask)."""
    torch.manual_seed(seed)
    model = create_model(f"fcmae_convnextv2_{variant}", backend="dense_masked", mask_ratio=mask_ratio,
                         drop_path_rate=drop_path_rate)
    randomise_affine(model, seed)
    h, w = size
    imgs = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed + 1))
    mask = model.random_masking(batch, (h // 32) * (w // 32), generator=torch.Generator().manual_seed(seed + 2))
    return model, imgs, mask


def run_step(model, imgs, mask, rng_seed: int = 123):
    """-> (loss, pred, {param name: grad}); RNG re-seeded so drop path draws the same."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    loss, pred, _ = model(imgs, mask=mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), grads


def assert_same_as_reference(model, imgs, mask, backend: str, reference: str = "dense_masked",
                             loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL, grad_atol=GRAD_ATOL):
    model.set_backend(reference)
    ref_loss, ref_pred, ref_grads = run_step(model, imgs, mask)
    model.set_backend(backend)
    loss, pred, grads = run_step(model, imgs, mask)
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0)
    assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=grad_rtol, atol=grad_atol,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    return pred, ref_pred


def assert_batch_independent(model, imgs, mask, backend: str, atol=1e-5, rtol=1e-4):
    """Each sample's pred is the same alone as in the batch (catches a batch-wide GRN)."""
    model.set_backend(backend)
    model.eval()
    with torch.no_grad():
        _, batch_pred, _ = model(imgs, mask=mask)
        for i in range(imgs.shape[0]):
            _, single, _ = model(imgs[i : i + 1], mask=mask[i : i + 1])
            torch.testing.assert_close(single[0], batch_pred[i], atol=atol, rtol=rtol)
