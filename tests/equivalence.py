"""Shared harness: does backend X compute the same numbers as the dense_masked reference?

Used by every backend's tests so they all face the same cases. GRN gamma/beta and the
norms' affine params are randomised first: at init GRN is the identity, which would
hide a wrong (e.g. batch-wide) GRN norm.

Tolerances paired with the dtype of the step. float32: elementwise, rounding order only.
bfloat16 autocast: two engines that round at different points (the reference keeps an fp32
residual stream and casts around every op; the native engine stays in bf16) differ by the
sum of their rounding errors, which over a whole network is a few percent of a gradient:
measured on atto at 224 px, the largest relative norm of (native - dense_masked) over all
gradients is 0.05, the same size as either engine's distance to the fp32 step. So bf16 is
held to 5e-3 on the loss and 0.1 on each gradient's relative norm; a wrong term (a missing
sum, a batch-wide norm) is off by order 1.
"""
from __future__ import annotations

import contextlib

import torch

from sparse_mae import create_model, get_backend

LOSS_RTOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
BF16_LOSS_RTOL = 5e-3
BF16_GRAD_NORM_RTOL = 0.1


def randomise_affine(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".grn." in name or ".norm." in name or "stem.1" in name or "downsample.0" in name:
                p.copy_(p + 0.5 * torch.randn(p.shape, generator=g))


def make_case(variant: str, size, batch: int, mask_ratio: float, seed: int = 0, drop_path_rate: float = 0.0):
    """-> (model on dense_masked, imgs, mask)."""
    torch.manual_seed(seed)
    model = create_model(f"fcmae_convnextv2_{variant}", backend="dense_masked", drop_path_rate=drop_path_rate)
    randomise_affine(model, seed)
    h, w = size
    imgs = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed + 1))
    mask = model.random_masking(batch, (h // 32) * (w // 32), mask_ratio,
                                generator=torch.Generator().manual_seed(seed + 2))
    return model, imgs, mask


def run_step(model, imgs, mask, rng_seed: int = 123, dtype: torch.dtype = torch.float32):
    """-> (loss, pred, {param name: grad}); RNG re-seeded so drop path draws the same. A
    dtype other than float32 runs the forward under autocast."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(rng_seed)
    autocast = (torch.autocast(imgs.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    with autocast:
        loss, pred, _ = model(imgs, mask=mask)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), pred.detach(), grads


def relative_norm(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-30))


def assert_same_as_reference(model, imgs, mask, backend: str, reference: str = "dense_masked",
                             loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL, grad_atol=GRAD_ATOL,
                             dtype: torch.dtype = torch.float32):
    """The loss and every parameter gradient of one step of `backend` equal `reference`'s in
    the same dtype, at that dtype's tolerances (see the module docstring)."""
    model.set_backend(get_backend(reference))
    ref_loss, ref_pred, ref_grads = run_step(model, imgs, mask, dtype=dtype)
    model.set_backend(get_backend(backend))
    loss, pred, grads = run_step(model, imgs, mask, dtype=dtype)
    assert grads.keys() == ref_grads.keys(), set(grads) ^ set(ref_grads)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=grad_rtol, atol=grad_atol,
                                       msg=lambda m, name=name: f"grad of {name}: {m}")
        return pred, ref_pred
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=BF16_LOSS_RTOL, atol=0)
    for name in ref_grads:
        assert grads[name].dtype == ref_grads[name].dtype, f"grad of {name}: {grads[name].dtype}"
        assert bool(torch.isfinite(grads[name]).all()), f"grad of {name} is not finite"
        error = relative_norm(grads[name], ref_grads[name])
        assert error <= BF16_GRAD_NORM_RTOL, f"grad of {name}: relative norm difference {error:.3g} > {BF16_GRAD_NORM_RTOL}"
    return pred, ref_pred


def assert_batch_independent(model, imgs, mask, backend: str, atol=1e-5, rtol=1e-4):
    """Each sample's pred is the same alone as in the batch (catches a batch-wide GRN)."""
    model.set_backend(get_backend(backend))
    model.eval()
    with torch.no_grad():
        _, batch_pred, _ = model(imgs, mask=mask)
        for i in range(imgs.shape[0]):
            _, single, _ = model(imgs[i : i + 1], mask=mask[i : i + 1])
            torch.testing.assert_close(single[0], batch_pred[i], atol=atol, rtol=rtol)
