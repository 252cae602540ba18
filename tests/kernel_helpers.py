"""Helpers every kernel test shares (one copy, imported by the test files): dtype-paired
tolerances, layouts (random sites, patch-aligned masks, segment offsets), and running an
op forward and backward with one upstream gradient."""
from __future__ import annotations

import torch

from sparse_mae.models.geometry import visible_count

# (atol, rtol) per feature dtype. fp32 differs by summation order only; bf16 / fp16 also by
# the rounding of stored values (both sides accumulate in fp32 from the same inputs; Triton's
# interpreter truncates to bf16 where compiled code rounds: <= 1 ulp).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """assert_close at `dtype`'s tolerances, atol scaled by the reference's magnitude
    (gradients are long sums whose rounding error grows with their size)."""
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.float().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def random_sites(batch: int, height: int, width: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` distinct (sample, y, x) sites in sample-major order: an irregular layout with
    absent neighbours."""
    grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(height), torch.arange(width),
                                      indexing="ij"), -1).reshape(-1, 3)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return grid[pick.sort().values]


def random_patch_mask(batch: int, rows: int, cols: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """(batch, rows, cols) patch mask, 1 = removed, each sample keeping the same count."""
    gen = torch.Generator().manual_seed(seed)
    keep = visible_count(rows * cols, ratio)
    mask = torch.ones(batch, rows * cols)
    for n in range(batch):
        mask[n, torch.randperm(rows * cols, generator=gen)[:keep]] = 0
    return mask.view(batch, rows, cols)


def patch_aligned_sites(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Sites of the kept patches (mask 1 = removed) upsampled by `patch`, sample-major."""
    keep = (mask == 0).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return torch.nonzero(keep)


def odd_patch_mask() -> torch.Tensor:
    """2 samples on a 3x4 grid, 5 visible patches, neighbours across and along rows."""
    mask = torch.ones(2, 3, 4)
    for n, y, x in [(0, 0, 0), (0, 0, 1), (0, 2, 3), (1, 1, 1), (1, 2, 1)]:
        mask[n, y, x] = 0
    return mask


def offsets_from_lengths(lengths: list[int]) -> torch.Tensor:
    """Segment offsets (N+1,) int64 from the segments' row counts."""
    return torch.tensor([0] + list(lengths)).cumsum(0)


def offsets_of_sites(sites: torch.Tensor, batch: int) -> torch.Tensor:
    counts = torch.bincount(sites[:, 0], minlength=batch)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])


def run_with_grads(fn, inputs: list, grad_out: torch.Tensor | None = None, seed: int = 7):
    """fn(*inputs) and the gradient of every float input (None inputs pass through) for one
    upstream gradient (random unless given) -> (out, [grads], grad_out)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) if isinstance(t, torch.Tensor) else t
              for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    out.backward(grad_out)
    grads = [t.grad for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return out.detach(), grads, grad_out


def compare_with_reference(op, reference, inputs: list, dtype: torch.dtype, names: list[str]) -> None:
    """op and reference on the same inputs and upstream gradient: the output and every
    gradient close at `dtype`'s tolerances. Parameter gradients are float32 sums, but of
    products of values stored in `dtype` (where one rounding may differ), so they are held to
    the features' tolerances too. names: one per float input."""
    out, grads, grad_out = run_with_grads(op, inputs)
    ref, ref_grads, _ = run_with_grads(reference, inputs, grad_out)
    assert_close(out, ref, dtype, "output")
    assert len(grads) == len(ref_grads) == len(names), (len(grads), len(ref_grads), names)
    for name, g, r in zip(names, grads, ref_grads):
        assert g is not None and r is not None, f"grad {name} missing"
        assert_close(g, r, dtype, f"grad {name}")
