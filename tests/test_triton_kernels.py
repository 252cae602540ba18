"""What is particular to the Triton kernels (the Triton halves of sparse_mae_kernels.ops.rows_*;
their outputs and gradients against the references are in test_kernels_rows, which runs
them in Triton's CPU interpreter without a GPU): a clear refusal without the interpreter,
every kernel variant compiling for sm_90 without a GPU, the contract with the native
engine's layout, the engine end to end on them, and stage-sized cases on a real GPU."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sparse_mae.models.geometry import GRN_EPS, LN_EPS
from sparse_mae_kernels.ops import rows_dwconv as dw
from sparse_mae_kernels.ops import rows_gather_conv as gc
from sparse_mae_kernels.ops import rows_grn as grn
from sparse_mae_kernels.ops import rows_layernorm as ln
from sparse_mae_kernels.ops import rows_residual as res
from sparse_mae_kernels.ops.rows_dwconv_layernorm import rows_dwconv_layernorm, rows_dwconv_layernorm_reference
from sparse_mae_kernels.ops.tiles_dwconv import tiles_dwconv
from sparse_mae_kernels.ops.tiles_grn import tiles_grn
from sparse_mae_kernels.triton_runtime import triton, triton_available
from tests.kernel_helpers import (
    assert_close,
    compare_with_reference,
    offsets_of_sites,
    patch_aligned_sites,
    random_patch_mask,
    random_sites,
)

needs_triton = pytest.mark.skipif(triton is None, reason="triton is not installed")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if triton is None:
        pytest.skip("triton is not installed")
    if request.param == "cpu":
        if torch.cuda.is_available():
            pytest.skip("CUDA present: the Triton kernels run compiled in the cuda cases")
        if not triton_available("cpu"):
            # without a GPU these cases are the only run of the kernels: never skip them silently
            pytest.fail("Triton's CPU interpreter is off: Triton was imported before TRITON_INTERPRET=1 "
                        "was set (tests/conftest.py sets it at start-up)")
    return torch.device(request.param)


def test_cpu_without_interpreter_refuses_with_a_pointer_to_the_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    nbr = dw.neighbour_map(random_sites(1, 3, 3, 5), 3, 3)
    x = torch.randn(5, 2)
    with pytest.raises(RuntimeError, match="reference"):
        dw.rows_dwconv(x, nbr, torch.randn(2, 49), impl="triton")
    with pytest.raises(RuntimeError, match="reference"):
        grn.rows_grn(x, torch.tensor([0, 5]), torch.randn(2), torch.randn(2), eps=GRN_EPS, impl="triton")
    with pytest.raises(RuntimeError, match="reference"):
        ln.rows_layernorm(x, torch.ones(2), torch.zeros(2), LN_EPS, impl="triton")
    with pytest.raises(RuntimeError, match="reference"):
        res.rows_residual(x, x, impl="triton")
    with pytest.raises(RuntimeError, match="reference"):
        gc.rows_gather_conv(x, nbr[:, :9], torch.randn(4, 2, 3, 3), impl="triton")


@needs_triton
def test_non_contiguous_inputs_are_made_contiguous(device):
    m, c = 21, 9
    nbr = dw.neighbour_map(random_sites(1, 5, 6, m, seed=8), 5, 6).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, 2 * c, generator=gen).to(device)[:, ::2]  # strided view
    assert not x.is_contiguous()
    weight_t = torch.randn(49, c, generator=gen).to(device)
    torch.testing.assert_close(dw.rows_dwconv(x, nbr, weight_t.t(), impl="triton"),
                               dw.rows_dwconv_reference(x.contiguous(), nbr, weight_t.t().contiguous()))
    offsets = torch.tensor([0, 9, 21], device=device)
    gamma, beta = torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    torch.testing.assert_close(grn.rows_grn(x, offsets, gamma, beta, eps=GRN_EPS, impl="triton"),
                               grn.rows_grn_reference(x.contiguous(), offsets, gamma, beta, eps=GRN_EPS))


@needs_triton
@pytest.mark.slow
def test_every_kernel_variant_compiles_for_sm90():
    """The interpreter does not compile; build every launch variant to a cubin (no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-m", "sparse_mae_kernels.triton_aot", "--arch", "90"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiled" in done.stdout


@needs_triton
@pytest.mark.parametrize("stage", [1, 3])
def test_matches_the_tile_ops_on_the_native_layout(device, stage):
    """The contract with the native engine: its neighbour map and row offsets fed to the Triton
    kernels give what its tile ops (halo conv, per-patch GRN) give on the same packed rows."""
    from sparse_mae.backends.native.layout import SparseLayout

    mask = random_patch_mask(3, 3, 4, ratio=0.5, seed=6)
    mask[1] = 1
    mask[1, 2, 3] = 0  # one sample keeps a single corner patch
    layout = SparseLayout(mask.to(device))
    st = layout.stage(stage)
    side, patches, c = st.side, layout.num_patches, 6
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(patches * side * side, c, generator=gen).to(device)
    weight, bias = torch.randn(c, 1, 7, 7, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    tiles = tiles_dwconv(x.view(patches, side, side, c), st.halo_index, weight, bias)
    torch.testing.assert_close(dw.rows_dwconv(x, st.neighbour_map(), weight.view(c, 49), bias, impl="triton"),
                               tiles.reshape(-1, c))
    gamma, beta = torch.randn(c, generator=gen).to(device), torch.randn(c, generator=gen).to(device)
    expected = tiles_grn(x.view(patches, side * side, c), layout.patch_sample, layout.batch, gamma, beta, GRN_EPS)
    torch.testing.assert_close(grn.rows_grn(x, st.row_offsets, gamma, beta, eps=GRN_EPS, impl="triton"),
                               expected.reshape(-1, c))


@needs_triton
@pytest.mark.slow  # ~20 s in the interpreter
def test_native_backend_on_the_triton_kernels_equals_dense_masked(device, monkeypatch):
    """End to end: the native engine running the Triton kernels (forced on, here in the
    interpreter) gives the dense_masked loss and gradients, at the harness's fp32 tolerances."""
    import sparse_mae_kernels
    from tests.equivalence import assert_same_as_reference, make_case

    monkeypatch.setattr(sparse_mae_kernels, "row_impl", lambda dev: "triton")
    model, imgs, mask = make_case("debug", (64, 64), batch=2, mask_ratio=0.5, seed=3)
    model, imgs, mask = model.to(device), imgs.to(device), mask.to(device)
    assert_same_as_reference(model, imgs, mask, "native")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_stage_sized_layout(dtype):
    """Atto stage-1-like sizes on a real patch layout: many row tiles, chunks and splits."""
    batch, rows, cols, patch, c = 8, 7, 7, 8, 40
    sites = patch_aligned_sites(random_patch_mask(batch, rows, cols, ratio=0.6, seed=11), patch)
    nbr = dw.neighbour_map(sites, rows * patch, cols * patch).cuda()
    offsets = offsets_of_sites(sites, batch).cuda()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sites.shape[0], c, generator=gen).cuda().to(dtype)
    weight = (0.2 * torch.randn(c, 49, generator=gen)).cuda()
    vecs = [torch.randn(c, generator=gen).cuda() for _ in range(3)]
    compare_with_reference(
        lambda x, w, b, lw, lb: rows_dwconv_layernorm(x, nbr, w, b, lw, lb, LN_EPS, impl="triton"),
        lambda x, w, b, lw, lb: rows_dwconv_layernorm_reference(x, nbr, w, b, lw, lb, LN_EPS),
        [x, weight, *vecs], dtype, ["x", "weight", "bias", "ln_weight", "ln_bias"])
    hidden = 4 * c
    h = torch.randn(sites.shape[0], hidden, generator=gen).cuda().to(dtype)
    hv = [torch.randn(hidden, generator=gen).cuda() for _ in range(3)]
    compare_with_reference(
        lambda x, g, b, ib: grn.rows_grn(x, offsets, g, b, ib, gelu=True, eps=GRN_EPS, impl="triton"),
        lambda x, g, b, ib: grn.rows_grn_reference(x, offsets, g, b, ib, gelu=True, eps=GRN_EPS),
        [h, *hv], dtype, ["x", "gamma", "beta", "input_bias"])
    out = res.rows_residual(x, x, vecs[0], impl="triton")
    assert_close(out, res.rows_residual_reference(x, x, vecs[0]), dtype, "residual")
