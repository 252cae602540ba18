"""The C kernels (sparse_mae_kernels.cpu_ops) against the plain-torch reference of the
packed-row depthwise conv (dwconv_rows.sparse_dwconv_reference): output and every
gradient, fp32 / bf16 / fp16 with dtype-paired tolerances, odd sizes (channel counts
that hit every chunk path of the C code), absent neighbours, any thread count; plus the
build, the switch and the fallback."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import sparse_mae_kernels
from sparse_mae.backends.native.layout import SparseLayout
from sparse_mae_kernels import cpu_ops
from sparse_mae_kernels.dwconv_rows import neighbour_map, sparse_dwconv_reference

# (atol, rtol) per feature dtype. fp32 differs by summation order only; bf16/fp16 also by
# the rounding of the output (both sides accumulate in fp32 from the same cast inputs).
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason=f"C kernels: {cpu_ops.unavailable_reason()}")


def random_sites(batch: int, height: int, width: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` distinct (sample, y, x) sites, sample-major: an irregular layout."""
    grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(height), torch.arange(width),
                                      indexing="ij"), -1).reshape(-1, 3)
    pick = torch.randperm(grid.shape[0], generator=torch.Generator().manual_seed(seed))[:count]
    return grid[pick.sort().values]


def run_with_grads(fn, x, nbr, weight, bias, grad_out):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    out = fn(leaves[0], nbr, leaves[1], leaves[2])
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves if t is not None]


def assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    # gradients are long sums: scale atol with the reference's magnitude
    atol = atol * max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("channels", [1, 13, 40, 41, 72])  # chunks of 32, 8 and 1 channels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_reference(channels, dtype, with_bias):
    sites = random_sites(3, 9, 7, 101, seed=channels)  # ~half the grid: many absent neighbours
    nbr = neighbour_map(sites, 9, 7)
    assert bool((nbr == -1).any())
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(sites.shape[0], channels, generator=gen).to(dtype)
    weight = torch.randn(channels, 49, generator=gen)  # fp32 parameters, as the engine passes them
    bias = torch.randn(channels, generator=gen) if with_bias else None
    grad_out = torch.randn(x.shape, generator=gen).to(dtype)

    out, grads = run_with_grads(cpu_ops.sparse_dwconv, x, nbr, weight, bias, grad_out)
    ref, ref_grads = run_with_grads(sparse_dwconv_reference, x, nbr, weight, bias, grad_out)
    assert_close(out, ref, dtype, "output")
    for name, g, r in zip(["grad x", "grad weight", "grad bias"], grads, ref_grads):
        # parameter gradients are fp32 sums of the same products: fp32 tolerances
        assert_close(g, r, dtype if name == "grad x" else torch.float32, name)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_equals_dense_conv_on_the_engines_patch_layout(stage):
    """The engine's own neighbour map, every stage: equals F.conv2d on the zero-filled map."""
    mask = torch.ones(2, 3, 4)
    for n, y, x in [(0, 0, 0), (0, 0, 1), (0, 2, 3), (1, 1, 1), (1, 2, 1)]:
        mask[n, y, x] = 0
    layout = SparseLayout(mask)
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
    out = cpu_ops.sparse_dwconv(tiles.reshape(-1, c), st.neighbour_map(), weight, bias)
    torch.testing.assert_close(out.view(p, s, s, c), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_same_numbers(threads):
    sites = random_sites(2, 20, 20, 500, seed=1)  # enough rows to split over threads
    nbr = neighbour_map(sites, 20, 20)
    gen = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(500, 24, generator=gen), torch.randn(24, 49, generator=gen), torch.randn(24)
    grad_out = torch.randn(500, 24, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out, grads = run_with_grads(cpu_ops.sparse_dwconv, x, nbr, weight, bias, grad_out)
    finally:
        torch.set_num_threads(before)
    ref, ref_grads = run_with_grads(sparse_dwconv_reference, x, nbr, weight, bias, grad_out)
    assert_close(out, ref, torch.float32, "output")
    for name, g, r in zip(["grad x", "grad weight", "grad bias"], grads, ref_grads):
        assert_close(g, r, torch.float32, name)


def test_autocast_runs_in_the_autocast_dtype_like_the_reference():
    sites = random_sites(1, 6, 6, 20)
    nbr = neighbour_map(sites, 6, 6)
    x, weight = torch.randn(20, 16), torch.randn(16, 49)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cpu_ops.sparse_dwconv(x, nbr, weight)
        ref = sparse_dwconv_reference(x, nbr, weight)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output")


def test_empty_rows_and_input_grad_only():
    nbr = torch.empty(0, 49, dtype=torch.int32)
    assert cpu_ops.sparse_dwconv(torch.randn(0, 5), nbr, torch.randn(5, 49)).shape == (0, 5)
    sites = random_sites(1, 5, 5, 12, seed=2)
    nbr = neighbour_map(sites, 5, 5)
    x = torch.randn(12, 5, requires_grad=True)
    weight = torch.randn(5, 49)  # frozen: no gradient asked for
    cpu_ops.sparse_dwconv(x, nbr, weight).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    sparse_dwconv_reference(x_ref, nbr, weight).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    sites = random_sites(1, 4, 4, 6)
    nbr = neighbour_map(sites, 4, 4)
    x, weight = torch.randn(6, 3), torch.randn(3, 49)
    with pytest.raises(ValueError, match="int32"):
        cpu_ops.sparse_dwconv(x, nbr.long(), weight)
    with pytest.raises(ValueError, match=r"weight must be \(C, 49\)"):
        cpu_ops.sparse_dwconv(x, nbr, torch.randn(4, 49))
    out_of_range = nbr.clone()
    out_of_range[0, 0] = 6
    for check in (True, False):  # the range check keeps the C code in bounds even unchecked
        with pytest.raises(ValueError, match=r"rows in \[0, 6\)"):
            cpu_ops.sparse_dwconv(x, out_of_range, weight, check_values=check)
    asymmetric = nbr.clone()
    row = int(torch.nonzero(nbr[:, 0] >= 0)[0]) if bool((nbr[:, 0] >= 0).any()) else None
    if row is not None:
        asymmetric[row, 0] = -1
        with pytest.raises(ValueError, match="submanifold"):
            cpu_ops.sparse_dwconv(x, asymmetric, weight)


def test_build_is_cached_and_a_missing_compiler_is_a_clear_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_MAE_CACHE", str(tmp_path))
    first = cpu_ops._build()
    assert first.parent == tmp_path / "kernels" and first.exists()
    assert cpu_ops._build() == first  # cached: no second compile
    assert not list(first.parent.glob("*.tmp"))

    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("SPARSE_MAE_CACHE", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="no C compiler found"):
        cpu_ops._build()


def test_switch_and_fallback_warning(monkeypatch):
    assert sparse_mae_kernels.use_cpu_kernels("cpu")
    assert not sparse_mae_kernels.use_cpu_kernels("meta")
    monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", "0")
    assert not sparse_mae_kernels.use_cpu_kernels("cpu")
    monkeypatch.delenv("SPARSE_MAE_CPU_KERNELS")
    # a failed build: the engine falls back to its torch ops, with one warning naming the reason
    monkeypatch.setattr(cpu_ops, "_library", None)
    monkeypatch.setattr(cpu_ops, "_error", "no C compiler found (cc)")
    monkeypatch.setattr(sparse_mae_kernels, "_warned_cpu_fallback", False)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert not sparse_mae_kernels.use_cpu_kernels("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not sparse_mae_kernels.use_cpu_kernels("cpu")  # warned once only
    with pytest.raises(RuntimeError, match="unavailable: no C compiler"):
        cpu_ops.sparse_dwconv(torch.randn(1, 2), torch.full((1, 49), -1, dtype=torch.int32), torch.randn(2, 49))
