"""What is particular to the C kernels (sparse_mae_kernels.cpu_build and the C halves of
ops/rows_*; their outputs and gradients against the references are in test_kernels_rows):
any thread count gives the reference's numbers, float16 through float32, a forked process
can use them, the neighbour map's range is checked always (it keeps the C reads in bounds),
bad input is a clear error, the build is cached, a missing compiler falls back with one
warning naming the reason."""
from __future__ import annotations

import multiprocessing
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparse_mae_kernels
from sparse_mae.backends.native.layout import SparseLayout
from sparse_mae.models.geometry import GRN_EPS, LN_EPS
from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.ops.rows_dwconv import neighbour_map, rows_dwconv, rows_dwconv_reference
from sparse_mae_kernels.ops.rows_dwconv_layernorm import rows_dwconv_layernorm, rows_dwconv_layernorm_reference
from sparse_mae_kernels.ops.rows_grn import rows_grn, rows_grn_reference
from sparse_mae_kernels.ops.rows_layernorm import rows_layernorm
from sparse_mae_kernels.ops.rows_residual import rows_residual
from tests.kernel_helpers import (
    compare_with_reference,
    odd_patch_mask,
    offsets_of_sites,
    random_sites,
)

pytestmark = pytest.mark.skipif(not cpu_build.available(), reason=f"C kernels: {cpu_build.unavailable_reason()}")


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_references_numbers(threads):
    sites = random_sites(2, 20, 20, 500, seed=1)  # enough rows to split over threads
    nbr, offsets = neighbour_map(sites, 20, 20), offsets_of_sites(sites, 2)
    gen = torch.Generator().manual_seed(1)
    x, weight = torch.randn(500, 24, generator=gen), torch.randn(24, 49, generator=gen)
    vecs = [torch.randn(24, generator=gen) for _ in range(4)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        compare_with_reference(
            lambda x, w, b, lw, lb: rows_dwconv_layernorm(x, nbr, w, b, lw, lb, LN_EPS),
            lambda x, w, b, lw, lb: rows_dwconv_layernorm_reference(x, nbr, w, b, lw, lb, LN_EPS),
            [x, weight, *vecs[:3]], torch.float32, ["x", "weight", "bias", "ln_weight", "ln_bias"])
        compare_with_reference(
            lambda x, g, b, ib: rows_grn(x, offsets, g, b, ib, gelu=True, eps=GRN_EPS),
            lambda x, g, b, ib: rows_grn_reference(x, offsets, g, b, ib, gelu=True, eps=GRN_EPS),
            [x, *vecs[:3]], torch.float32, ["x", "gamma", "beta", "input_bias"])
    finally:
        torch.set_num_threads(before)


def test_float16_runs_through_float32():
    sites = random_sites(1, 6, 7, 30, seed=2)
    nbr = neighbour_map(sites, 6, 7)
    x = torch.randn(30, 9).half()
    weight, bias = torch.randn(9, 49), torch.randn(9)
    compare_with_reference(lambda x, w, b: rows_dwconv(x, nbr, w, b), lambda x, w, b: rows_dwconv_reference(x, nbr, w, b),
                           [x, weight, bias], torch.float16, ["x", "weight", "bias"])


def _kernel_in_child(queue):
    # torch's own OpenMP pool is not fork-safe (DataLoader workers run it on 1 thread): torch on
    # 1 thread here, the kernels' pool on 2
    torch.set_num_threads(1)
    cpu_build.threads = lambda: 2
    sites = random_sites(2, 20, 20, 500, seed=3)
    nbr = neighbour_map(sites, 20, 20)
    x, weight = torch.randn(500, 8), torch.randn(8, 49)
    out = rows_dwconv(x, nbr, weight)
    queue.put(bool(torch.allclose(out, rows_dwconv_reference(x, nbr, weight), atol=1e-5)))


def test_a_forked_process_can_run_the_kernels():
    """The kernels' worker threads do not survive a fork (DataLoader workers fork): the child
    starts its own instead of waiting for the parent's forever."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sites = random_sites(2, 20, 20, 500, seed=3)
        rows_dwconv(torch.randn(500, 8), neighbour_map(sites, 20, 20), torch.randn(8, 49))  # workers started here
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        child = ctx.Process(target=_kernel_in_child, args=(queue,))
        child.start()
        child.join(timeout=120)
        alive = child.is_alive()
        if alive:
            child.kill()
        assert not alive, "the forked child hung in the kernels' thread pool"
        assert child.exitcode == 0 and queue.get(timeout=10)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_equals_dense_conv_on_the_engines_patch_layout(stage):
    """The engine's own neighbour map, every stage: equals F.conv2d on the zero-filled map."""
    layout = SparseLayout(odd_patch_mask())
    st = layout.stage(stage)
    s, c, p = st.side, 11, layout.num_patches
    gen = torch.Generator().manual_seed(stage)
    tiles = torch.randn(p, s, s, c, generator=gen)
    weight, bias = torch.randn(c, 1, 7, 7, generator=gen), torch.randn(c, generator=gen)
    canvas = torch.zeros(2, 3, 4, s, s, c)
    canvas[layout.patch_sample, layout.patch_y, layout.patch_x] = tiles
    dense = canvas.permute(0, 5, 1, 3, 2, 4).reshape(2, c, 3 * s, 4 * s)
    expected = F.conv2d(dense, weight, bias, padding=3, groups=c)
    expected = expected.reshape(2, c, 3, s, 4, s).permute(0, 2, 4, 3, 5, 1)[layout.patch_sample, layout.patch_y,
                                                                              layout.patch_x]
    out = rows_dwconv(tiles.reshape(-1, c), st.neighbour_map(), weight, bias)
    torch.testing.assert_close(out.view(p, s, s, c), expected, atol=1e-5, rtol=1e-5)


def test_empty_rows():
    nbr = torch.empty(0, 49, dtype=torch.int32)
    x = torch.randn(0, 5, requires_grad=True)
    out = rows_dwconv_layernorm(x, nbr, torch.randn(5, 49), torch.randn(5), torch.ones(5), torch.zeros(5), LN_EPS)
    assert out.shape == (0, 5)
    out.sum().backward()
    assert x.grad.shape == (0, 5)


def test_bad_inputs_are_clear_errors():
    sites = random_sites(1, 4, 4, 6)
    nbr = neighbour_map(sites, 4, 4)
    x, weight = torch.randn(6, 3), torch.randn(3, 49)
    with pytest.raises(ValueError, match="int32"):
        rows_dwconv(x, nbr.long(), weight)
    with pytest.raises(ValueError, match=r"weight must be \(C, 49\)"):
        rows_dwconv(x, nbr, torch.randn(4, 49))
    with pytest.raises(ValueError, match="packed rows"):
        rows_dwconv(x.view(2, 3, 3), nbr, weight)
    out_of_range = nbr.clone()
    out_of_range[0, 0] = 6
    for check in (True, False):  # the range check keeps the C code in bounds even unchecked
        with pytest.raises(ValueError, match=r"rows in \[0, 6\)"):
            rows_dwconv(x, out_of_range, weight, check_values=check)
        with pytest.raises(ValueError, match=r"rows in \[0, 6\)"):
            rows_dwconv_layernorm(x, out_of_range, weight, None, torch.ones(3), torch.zeros(3), LN_EPS,
                                  check_values=check)
    asymmetric = nbr.clone()
    row = int(torch.nonzero(nbr[:, 0] >= 0)[0]) if bool((nbr[:, 0] >= 0).any()) else None
    if row is not None:
        asymmetric[row, 0] = -1
        with pytest.raises(ValueError, match="submanifold"):
            rows_dwconv(x, asymmetric, weight)
    with pytest.raises(ValueError, match=r"out_rows values must be rows in \[0, 6\)"):
        rows_layernorm(x, torch.ones(3), torch.zeros(3), LN_EPS, out_rows=torch.tensor([0, 1, 2, 3, 4, 6]),
                       check_values=False)
    with pytest.raises(ValueError, match="permutation"):
        rows_layernorm(x, torch.ones(3), torch.zeros(3), LN_EPS, out_rows=torch.tensor([0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="rise from 0 to M"):  # the C kernels check offsets always
        rows_grn(x, torch.tensor([0, 4, 7]), torch.ones(3), torch.zeros(3), eps=GRN_EPS, check_values=False)
    with pytest.raises(ValueError, match="needs seg_offsets"):
        rows_residual(x, x, scale=torch.ones(2))
    with pytest.raises(ValueError, match="impl must be"):
        rows_dwconv(x, nbr, weight, impl="cuda")


def test_a_neighbour_map_changed_in_place_is_checked_again():
    """The range check is remembered per map version: writing into the map checks it anew."""
    sites = random_sites(1, 4, 4, 6)
    nbr = neighbour_map(sites, 4, 4)
    x, weight = torch.randn(6, 3), torch.randn(3, 49)
    rows_dwconv(x, nbr, weight, check_values=False)
    nbr[0, 0] = 99
    with pytest.raises(ValueError, match=r"rows in \[0, 6\)"):
        rows_dwconv(x, nbr, weight, check_values=False)


def test_build_is_cached_and_a_missing_compiler_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_MAE_CACHE", str(tmp_path))
    first = cpu_build._build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert cpu_build._build() == first  # cached: no second compile
    assert not list(first.parent.glob("*.tmp"))

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SPARSE_MAE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        cpu_build._build()


def test_switch_and_fallback_warning(monkeypatch):
    assert sparse_mae_kernels.use_cpu_kernels("cpu")
    assert not sparse_mae_kernels.use_cpu_kernels("meta")
    monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", "0")
    assert not sparse_mae_kernels.use_cpu_kernels("cpu")
    monkeypatch.delenv("SPARSE_MAE_CPU_KERNELS")
    # a failed build: the engine falls back to its torch ops, with one warning naming the reason
    monkeypatch.setattr(cpu_build, "_library", None)
    monkeypatch.setattr(cpu_build, "_error", "no C compiler found (cc)")
    monkeypatch.setattr(cpu_build, "_functions", {})
    monkeypatch.setattr(sparse_mae_kernels, "_warned_cpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not sparse_mae_kernels.use_cpu_kernels("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not sparse_mae_kernels.use_cpu_kernels("cpu")  # warned once only
    with pytest.raises(RuntimeError, match="unavailable: no C compiler"):
        rows_dwconv(torch.randn(1, 2), torch.full((1, 49), -1, dtype=torch.int32), torch.randn(2, 49))


def test_cuda_tensors_are_refused_with_a_pointer_to_triton():
    with pytest.raises(ValueError, match="impl='triton'"):
        cpu_build.require_cpu("rows_dwconv", x=torch.empty(0, device="meta"))
