"""Triton ops (sparse_mae_kernels.triton_ops) against their plain-torch references.

Without a GPU the kernels run in Triton's CPU interpreter: tests/conftest.py sets
TRITON_INTERPRET=1 at start-up, before anything imports Triton (its mode is fixed on first
import), and the `cpu` cases fail rather than skip if it is off. With CUDA the interpreter
stays off and the `cuda` cases run compiled. The references themselves are checked
against dense torch (F.conv2d on the zero-filled map, the model's GRN), which pins the
neighbour-offset convention and the GRN semantics.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparse_mae.models.convnextv2 import GRN
from sparse_mae_kernels import triton_ops as ops

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# (atol, rtol) per feature dtype: fp32 differs only by summation order; bf16/fp16 also by
# the final rounding (Triton's interpreter truncates to bf16 where CUDA rounds: <= 1 ulp).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


@pytest.fixture(scope="module")
def interpreter():
    """True if the Triton ops run on CPU tensors (interpreter on; conftest.py sets it without a GPU)."""
    return HAS_TRITON and not torch.cuda.is_available() and ops.triton_available("cpu")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request, interpreter):
    if not HAS_TRITON:
        pytest.skip("triton is not installed")
    if request.param == "cpu" and not interpreter:
        if torch.cuda.is_available():
            pytest.skip("CUDA present: the Triton ops run compiled in the cuda cases")
        # without a GPU these cases are the only test of the kernels: never skip them silently
        pytest.fail("Triton's CPU interpreter is off: Triton was imported before TRITON_INTERPRET=1 "
                    "was set (tests/conftest.py sets it at start-up)")
    return torch.device(request.param)


# -- layouts ----------------------------------------------------------------------------


def random_sites(batch: int, height: int, width: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` distinct (sample, y, x) sites in sample-major order: an irregular layout."""
    grid = torch.stack(
        torch.meshgrid(torch.arange(batch), torch.arange(height), torch.arange(width), indexing="ij"), -1
    ).reshape(-1, 3)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return grid[pick.sort().values]


def patch_aligned_sites(mask: torch.Tensor, patch: int) -> torch.Tensor:
    """Sites of the kept patches (mask 1 = removed) upsampled by `patch`, sample-major."""
    keep = (mask == 0).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    return torch.nonzero(keep)


def random_patch_mask(batch: int, rows: int, cols: int, ratio: float, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keep = max(1, int(rows * cols * (1 - ratio)))
    mask = torch.ones(batch, rows * cols)
    for n in range(batch):
        mask[n, torch.randperm(rows * cols, generator=gen)[:keep]] = 0
    return mask.view(batch, rows, cols)


def offsets_from_lengths(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lengths).cumsum(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def run_with_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor | None = None):
    """fn(*inputs) and the gradients of every input for the same upstream gradient."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves if t.requires_grad], grad_out


# -- references against dense torch (no Triton needed) ----------------------------------


def test_dwconv_reference_equals_dense_conv_at_visible_sites():
    """The offset convention: k = (dy+3)*7 + (dx+3) matches a dense (C, 1, 7, 7) weight."""
    batch, rows, cols, patch, channels = 2, 4, 5, 2, 5
    mask = random_patch_mask(batch, rows, cols, ratio=0.6, seed=1)
    sites = patch_aligned_sites(mask, patch)
    height, width = rows * patch, cols * patch
    nbr = ops.neighbour_map(sites, height, width)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sites.shape[0], channels, generator=gen)
    weight = torch.randn(channels, 1, 7, 7, generator=gen)
    bias = torch.randn(channels, generator=gen)

    dense = torch.zeros(batch, channels, height, width)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2]] = x
    expected = F.conv2d(dense, weight, bias, padding=3, groups=channels)[sites[:, 0], :, sites[:, 1], sites[:, 2]]

    torch.testing.assert_close(ops.sparse_dwconv_reference(x, nbr, weight.view(channels, 49), bias), expected)
    torch.testing.assert_close(ops.sparse_dwconv_reference(x, nbr, weight, bias), expected)  # (C,1,7,7) accepted


def test_neighbour_map_is_symmetric_and_marks_absent_sites():
    sites = random_sites(2, 6, 7, 37, seed=3)
    nbr = ops.neighbour_map(sites, 6, 7)
    assert nbr.dtype == torch.int32 and nbr.shape == (37, 49)
    assert bool((nbr[:, 24] == torch.arange(37)).all()), "tap 24 (dy = dx = 0) is the site itself"
    assert bool((nbr == -1).any())
    ops._check_neighbour_values(nbr)  # raises if not symmetric
    broken = nbr.clone()
    row = int(torch.nonzero(nbr[:, 0] >= 0)[0])
    broken[row, 0] = -1  # its partner still points back
    with pytest.raises(ValueError, match="submanifold"):
        ops._check_neighbour_values(broken)


def test_grn_reference_equals_dense_grn_on_zero_filled_map():
    batch, height, width, channels = 3, 4, 6, 11
    sites = random_sites(batch, height, width, 29, seed=5)
    counts = torch.bincount(sites[:, 0], minlength=batch)
    assert bool((counts > 0).all())
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sites.shape[0], channels, generator=gen)
    grn = GRN(channels)
    with torch.no_grad():
        grn.weight.normal_(generator=gen)
        grn.bias.normal_(generator=gen)
    dense = torch.zeros(batch, height, width, channels)
    dense[sites[:, 0], sites[:, 1], sites[:, 2]] = x
    expected = grn(dense)[sites[:, 0], sites[:, 1], sites[:, 2]]
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    actual = ops.segment_grn_reference(x, offsets, grn.weight, grn.bias)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


# -- Triton ops against the references --------------------------------------------------


@needs_triton
@pytest.mark.parametrize(
    "dtype, with_bias",
    [(torch.float32, True), (torch.float32, False), (torch.bfloat16, True), (torch.float16, True)],
)
def test_sparse_dwconv_matches_reference(device, dtype, with_bias):
    m, c = 37, 13  # odd sizes: partial row and channel tiles
    nbr = ops.neighbour_map(random_sites(2, 7, 6, m, seed=0), 7, 6).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, c, generator=gen).to(device, dtype)
    weight = torch.randn(c, 49, generator=gen).to(device)  # fp32 params, as the engine passes them
    bias = torch.randn(c, generator=gen).to(device) if with_bias else None

    def call(fn):
        return lambda x, w, *b: fn(x, nbr, w, b[0] if b else None)

    inputs = [x, weight] + ([bias] if with_bias else [])
    out, grads, grad_out = run_with_grads(call(ops.sparse_dwconv), inputs)
    ref, ref_grads, _ = run_with_grads(call(ops.sparse_dwconv_reference), inputs, grad_out)
    assert_close(out, ref, dtype, "output")
    for name, g, r in zip(["grad x", "grad weight", "grad bias"], grads, ref_grads):
        # parameter grads are fp32 sums of the same products: fp32 tolerance
        assert_close(g, r, dtype if name == "grad x" else torch.float32, name)


@needs_triton
def test_sparse_dwconv_equals_dense_conv_on_patch_layout(device):
    batch, rows, cols, patch, channels = 2, 3, 4, 4, 20
    mask = random_patch_mask(batch, rows, cols, ratio=0.6, seed=2)
    sites = patch_aligned_sites(mask, patch)
    height, width = rows * patch, cols * patch
    nbr = ops.neighbour_map(sites, height, width).to(device)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(sites.shape[0], channels, generator=gen)
    weight = torch.randn(channels, 1, 7, 7, generator=gen)
    bias = torch.randn(channels, generator=gen)
    dense = torch.zeros(batch, channels, height, width)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2]] = x
    expected = F.conv2d(dense, weight, bias, padding=3, groups=channels)[sites[:, 0], :, sites[:, 1], sites[:, 2]]
    actual = ops.sparse_dwconv(x.to(device), nbr, weight.view(channels, 49).to(device), bias.to(device))
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_segment_grn_matches_reference(device, dtype):
    lengths = [1, 20, 3, 13]  # unequal, one single-row sample; M = 37
    c = 13
    offsets = offsets_from_lengths(lengths).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(lengths), c, generator=gen).to(device, dtype)
    gamma = torch.randn(c, generator=gen).to(device)
    beta = torch.randn(c, generator=gen).to(device)

    def call(fn):
        return lambda x, g, b: fn(x, offsets, g, b)

    out, grads, grad_out = run_with_grads(call(ops.segment_grn), [x, gamma, beta])
    ref, ref_grads, _ = run_with_grads(call(ops.segment_grn_reference), [x, gamma, beta], grad_out)
    assert_close(out, ref, dtype, "output")
    assert_close(grads[0], ref_grads[0], dtype, "grad x")
    assert_close(grads[1], ref_grads[1], torch.float32, "grad gamma")
    assert_close(grads[2], ref_grads[2], torch.float32, "grad beta")


@needs_triton
def test_segment_grn_zero_norm_and_empty_segment(device):
    """A channel that is all zero in a sample (norm 0) gets gradient 0 like torch's norm, not NaN."""
    lengths = [5, 0, 7]
    c = 6
    offsets = offsets_from_lengths(lengths).to(device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(sum(lengths), c, generator=gen)
    x[:5, 2] = 0.0
    x, gamma, beta = x.to(device), torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)

    def call(fn):
        return lambda x, g, b: fn(x, offsets, g, b)

    out, grads, grad_out = run_with_grads(call(ops.segment_grn), [x, gamma, beta])
    ref, ref_grads, _ = run_with_grads(call(ops.segment_grn_reference), [x, gamma, beta], grad_out)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert_close(out, ref, torch.float32, "output")
    for name, g, r in zip(["grad x", "grad gamma", "grad beta"], grads, ref_grads):
        assert_close(g, r, torch.float32, name)


@needs_triton
def test_non_contiguous_inputs_are_made_contiguous(device):
    m, c = 21, 9
    nbr = ops.neighbour_map(random_sites(1, 5, 6, m, seed=8), 5, 6).to(device)
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(m, 2 * c, generator=gen).to(device)
    x = wide[:, ::2]  # strided view
    assert not x.is_contiguous()
    weight_t = torch.randn(49, c, generator=gen).to(device)
    torch.testing.assert_close(
        ops.sparse_dwconv(x, nbr, weight_t.t()), ops.sparse_dwconv_reference(x.contiguous(), nbr, weight_t.t().contiguous())
    )
    offsets = offsets_from_lengths([9, 12]).to(device)
    gamma, beta = torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    torch.testing.assert_close(
        ops.segment_grn(x, offsets, gamma, beta), ops.segment_grn_reference(x.contiguous(), offsets, gamma, beta)
    )


@needs_triton
def test_sparse_dwconv_under_autocast_runs_in_autocast_dtype(device):
    m, c = 19, 8
    nbr = ops.neighbour_map(random_sites(1, 5, 5, m, seed=9), 5, 5).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, c, generator=gen).to(device)
    weight, bias = torch.randn(c, 49, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, grads, grad_out = run_with_grads(lambda *a: ops.sparse_dwconv(a[0], nbr, *a[1:]), [x, weight, bias])
        ref, ref_grads, _ = run_with_grads(
            lambda *a: ops.sparse_dwconv_reference(a[0], nbr, *a[1:]), [x, weight, bias], grad_out
        )
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output")
    for name, g, r in zip(["grad x", "grad weight", "grad bias"], grads, ref_grads):
        assert g.dtype == torch.float32, f"{name} reaches the fp32 leaf in fp32"
        assert_close(g, r, torch.bfloat16, name)


# -- bad input ------------------------------------------------------------------------------


@needs_triton
def test_bad_inputs_raise_clear_errors(device):
    m, c = 10, 4
    nbr = ops.neighbour_map(random_sites(1, 4, 4, m, seed=1), 4, 4).to(device)
    x = torch.randn(m, c, device=device)
    weight, bias = torch.randn(c, 49, device=device), torch.randn(c, device=device)
    with pytest.raises(ValueError, match=r"nbr must be \(M, 49\)"):
        ops.sparse_dwconv(x, nbr[:, :48], weight, bias)
    with pytest.raises(ValueError, match="int32"):
        ops.sparse_dwconv(x, nbr.long(), weight, bias)
    with pytest.raises(ValueError, match=r"weight must be \(C, 49\)"):
        ops.sparse_dwconv(x, nbr, weight[:3], bias)
    with pytest.raises(ValueError, match=r"bias must be \(C,\)"):
        ops.sparse_dwconv(x, nbr, weight, bias[:3])
    with pytest.raises(ValueError, match="packed rows"):
        ops.sparse_dwconv(x.view(2, 5, c), nbr, weight, bias)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ops.sparse_dwconv(x.double(), nbr, weight, bias)
    out_of_range = nbr.clone()
    out_of_range[0, 0] = m
    with pytest.raises(ValueError, match="nbr values"):
        ops.sparse_dwconv(x, out_of_range, weight, bias, check_values=True)

    offsets = offsets_from_lengths([4, 6]).to(device)
    gamma, beta = torch.randn(c, device=device), torch.randn(c, device=device)
    with pytest.raises(ValueError, match="int64"):
        ops.segment_grn(x, offsets.int(), gamma, beta)
    with pytest.raises(ValueError, match="rise from 0 to M"):
        ops.segment_grn(x, offsets_from_lengths([4, 5]).to(device), gamma, beta, check_values=True)
    with pytest.raises(ValueError, match=r"gamma must be \(C,\)"):
        ops.segment_grn(x, offsets, gamma.view(1, c), beta)
    with pytest.raises(ValueError, match=r"seg_offsets must be \(N\+1,\)"):
        ops.segment_grn(x, offsets[:1], gamma, beta)


def test_cpu_without_interpreter_refuses_with_a_pointer_to_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not ops.triton_available("cpu")
    sites = random_sites(1, 3, 3, 5)
    nbr = ops.neighbour_map(sites, 3, 3)
    with pytest.raises(RuntimeError, match="reference"):
        ops.sparse_dwconv(torch.randn(5, 2), nbr, torch.randn(2, 49))
    with pytest.raises(RuntimeError, match="reference"):
        ops.segment_grn(torch.randn(5, 2), torch.tensor([0, 5]), torch.randn(2), torch.randn(2))


# -- compiled kernels -------------------------------------------------------------------


@needs_triton
@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    """The interpreter does not compile; build every launch variant to a cubin (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "sparse_mae_kernels.triton_aot", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stage_sized_layout(dtype):
    """Atto stage-1-like sizes on a real patch layout: many row tiles, chunks and splits."""
    batch, rows, cols, patch, channels = 8, 7, 7, 8, 40
    mask = random_patch_mask(batch, rows, cols, ratio=0.6, seed=11)
    sites = patch_aligned_sites(mask, patch)
    nbr = ops.neighbour_map(sites, rows * patch, cols * patch).cuda()
    counts = torch.bincount(sites[:, 0], minlength=batch)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).cuda()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sites.shape[0], channels, generator=gen).cuda().to(dtype)
    weight, bias = torch.randn(channels, 49, generator=gen).cuda(), torch.randn(channels, generator=gen).cuda()

    out, grads, grad_out = run_with_grads(lambda *a: ops.sparse_dwconv(a[0], nbr, *a[1:]), [x, weight, bias])
    ref, ref_grads, _ = run_with_grads(lambda *a: ops.sparse_dwconv_reference(a[0], nbr, *a[1:]), [x, weight, bias], grad_out)
    assert_close(out, ref, dtype, "dwconv output")
    assert_close(grads[0], ref_grads[0], dtype, "dwconv grad x")
    # thousands of rows summed in different orders: scale the fp32 tolerance
    torch.testing.assert_close(grads[1], ref_grads[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grads[2], ref_grads[2], atol=1e-3, rtol=1e-4)

    hidden = 4 * channels
    h = torch.randn(sites.shape[0], hidden, generator=gen).cuda().to(dtype)
    gamma, beta = torch.randn(hidden, generator=gen).cuda(), torch.randn(hidden, generator=gen).cuda()
    out, grads, grad_out = run_with_grads(lambda *a: ops.segment_grn(a[0], offsets, *a[1:]), [h, gamma, beta])
    ref, ref_grads, _ = run_with_grads(lambda *a: ops.segment_grn_reference(a[0], offsets, *a[1:]), [h, gamma, beta], grad_out)
    assert_close(out, ref, dtype, "grn output")
    assert_close(grads[0], ref_grads[0], dtype, "grn grad x")
    torch.testing.assert_close(grads[1], ref_grads[1], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(grads[2], ref_grads[2], atol=1e-3, rtol=1e-4)


@needs_triton
@pytest.mark.parametrize("stage", [1, 3])
def test_matches_native_engine_ops_on_its_layout(device, stage):
    """The contract with the native engine: its neighbour map / row offsets fed to the Triton
    ops give what its own halo-tile conv and per-patch GRN give on the same packed rows."""
    layout_module = pytest.importorskip("sparse_mae.backends.native.layout")
    from sparse_mae_kernels import sparse_ops

    mask = random_patch_mask(3, 3, 4, ratio=0.5, seed=6)
    mask[1] = 1
    mask[1, 2, 3] = 0  # one sample keeps a single corner patch
    layout = layout_module.SparseLayout(mask.to(device))
    st = layout.stage(stage)
    side, patches, c = st.side, layout.num_patches, 6
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(patches * side * side, c, generator=gen).to(device)
    weight, bias = torch.randn(c, 1, 7, 7, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    tiles = sparse_ops.tile_dwconv(x.view(patches, side, side, c), st.halo_index, weight, bias)
    torch.testing.assert_close(ops.sparse_dwconv(x, st.neighbour_map(), weight.view(c, 49), bias), tiles.reshape(-1, c))

    gamma, beta = torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    grn = sparse_ops.segment_grn(x.view(patches, side * side, c), layout.patch_sample, layout.batch, gamma, beta)
    torch.testing.assert_close(ops.segment_grn(x, st.row_offsets, gamma, beta), grn.reshape(-1, c))


@needs_triton
@pytest.mark.slow  # ~12 s in the interpreter
def test_native_backend_with_triton_ops_equals_dense_masked(device, monkeypatch):
    """End to end: the native engine running these ops (forced on, here in the interpreter)
    gives the dense_masked loss and gradients, at the harness's fp32 tolerances."""
    engine = pytest.importorskip("sparse_mae.backends.native.engine")
    from tests.equivalence import assert_same_as_reference, make_case

    kernels = engine.RowKernels(dwconv=ops.sparse_dwconv, grn=ops.segment_grn)
    monkeypatch.setattr(engine, "_row_kernels", lambda dev: kernels)
    model, imgs, mask = make_case("debug", (64, 64), batch=2, mask_ratio=0.5, seed=3)
    model, imgs, mask = model.to(device), imgs.to(device), mask.to(device)
    assert_same_as_reference(model, imgs, mask, "native")
