"""Every packed-row op (sparse_mae_kernels.ops.rows_*) against its plain-torch reference, in
both implementations: the C kernels on CPU and the Triton kernels (in Triton's CPU
interpreter without a GPU, compiled on CUDA). Output and every gradient, float32 and
bfloat16 at paired tolerances, odd channel counts (the C kernels' partial vectors and
channel blocks: 1, 13, 40, 130), absent neighbours, empty and single-row segments, zero
norms. The references themselves are checked against dense torch at the end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_mae.models.convnextv2 import GRN
from sparse_mae.models.geometry import GRN_EPS, LN_EPS
from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.ops.rows_dwconv import neighbour_map, rows_dwconv, rows_dwconv_reference
from sparse_mae_kernels.ops.rows_dwconv_layernorm import rows_dwconv_layernorm, rows_dwconv_layernorm_reference
from sparse_mae_kernels.ops.rows_grn import rows_grn, rows_grn_reference
from sparse_mae_kernels.ops.rows_layernorm import rows_layernorm, rows_layernorm_reference
from sparse_mae_kernels.ops.rows_residual import rows_residual, rows_residual_reference
from sparse_mae_kernels.triton_runtime import triton, triton_available
from tests.kernel_helpers import (
    assert_close,
    compare_with_reference,
    offsets_from_lengths,
    offsets_of_sites,
    patch_aligned_sites,
    random_patch_mask,
    random_sites,
    run_with_grads,
)


@pytest.fixture(params=["c", "triton-cpu", pytest.param("triton-cuda", marks=pytest.mark.gpu)])
def impl(request):
    """(impl, device) of one implementation; the Triton-on-CPU case never skips silently."""
    if request.param == "c":
        if not cpu_build.available():
            pytest.fail(f"the C kernels do not build here: {cpu_build.unavailable_reason()}")
        return "c", torch.device("cpu")
    if triton is None:
        pytest.skip("triton is not installed")
    if request.param == "triton-cuda":
        return "triton", torch.device("cuda")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the Triton kernels run compiled in the triton-cuda cases")
    if not triton_available("cpu"):
        pytest.fail("Triton's CPU interpreter is off: Triton was imported before TRITON_INTERPRET=1 "
                    "was set (tests/conftest.py sets it at start-up)")
    return "triton", torch.device("cpu")


def channel_counts(impl_name: str, layernorm: bool = False) -> list[int]:
    # the interpreter is slow: fewer sizes there, still odd ones. A LayerNorm over 1 channel is
    # degenerate (rstd = 1/sqrt(eps) amplifies the reference's own rounding): 3 instead.
    return [3 if layernorm else 1, 13, 40, 130] if impl_name == "c" else [13, 40]


def layout(channels: int, seed: int = 0):
    """~half of a 3 x 9 x 7 grid: many absent neighbours, unequal samples."""
    sites = random_sites(3, 9, 7, 101, seed=seed + channels)
    nbr = neighbour_map(sites, 9, 7)
    assert bool((nbr == -1).any())
    return sites, nbr


def features(m: int, c: int, dtype, device, seed: int, scale: float = 1.0):
    return (scale * torch.randn(m, c, generator=torch.Generator().manual_seed(seed))).to(device, dtype)


def params(c: int, device, seed: int, count: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(c, generator=gen)).to(device) for _ in range(count)]


# -- depthwise 7x7 --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_dwconv_matches_reference(impl, dtype, with_bias):
    name, device = impl
    for c in channel_counts(name):
        _, nbr = layout(c)
        nbr = nbr.to(device)
        x = features(nbr.shape[0], c, dtype, device, seed=c)
        weight = (0.2 * torch.randn(c, 49, generator=torch.Generator().manual_seed(c))).to(device)  # fp32 params
        inputs = [x, weight] + ([params(c, device, c, 1)[0]] if with_bias else [])

        def op(x, w, *b, fn=rows_dwconv):
            return fn(x, nbr, w, b[0] if b else None, impl=name)

        def ref(x, w, *b):
            return rows_dwconv_reference(x, nbr, w, b[0] if b else None)

        compare_with_reference(op, ref, inputs, dtype, ["x", "weight"] + (["bias"] if with_bias else []))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dwconv_layernorm_matches_reference(impl, dtype):
    name, device = impl
    for c in channel_counts(name, layernorm=True):
        _, nbr = layout(c, seed=1)
        nbr = nbr.to(device)
        x = features(nbr.shape[0], c, dtype, device, seed=c)
        weight = (0.2 * torch.randn(c, 49, generator=torch.Generator().manual_seed(c))).to(device)
        bias, ln_w, ln_b = params(c, device, c + 1, 3)
        compare_with_reference(
            lambda x, w, b, lw, lb: rows_dwconv_layernorm(x, nbr, w, b, lw, lb, LN_EPS, impl=name),
            lambda x, w, b, lw, lb: rows_dwconv_layernorm_reference(x, nbr, w, b, lw, lb, LN_EPS),
            [x, weight, bias, ln_w, ln_b], dtype, ["x", "weight", "bias", "ln_weight", "ln_bias"])


def test_dwconv_frozen_weight_and_no_bias(impl):
    """Only the input gradient asked for (a frozen conv): the kernels skip the weight gradient."""
    name, device = impl
    _, nbr = layout(5, seed=2)
    nbr = nbr.to(device)
    x = features(nbr.shape[0], 5, torch.float32, device, seed=2).requires_grad_()
    weight = torch.randn(5, 49).to(device)
    rows_dwconv(x, nbr, weight, impl=name).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    rows_dwconv_reference(x_ref, nbr, weight).square().sum().backward()
    assert_close(x.grad, x_ref.grad, torch.float32, "grad x")


def test_dwconv_equals_dense_conv_on_a_patch_layout(impl):
    """The offset convention on a real patch layout: equals F.conv2d on the zero-filled map."""
    name, device = impl
    batch, rows, cols, patch, c = 2, 3, 4, 4, 20
    sites = patch_aligned_sites(random_patch_mask(batch, rows, cols, ratio=0.6, seed=2), patch)
    h, w = rows * patch, cols * patch
    nbr = neighbour_map(sites, h, w)
    gen = torch.Generator().manual_seed(3)
    x, weight, bias = torch.randn(sites.shape[0], c, generator=gen), torch.randn(c, 1, 7, 7, generator=gen), torch.randn(c)
    dense = torch.zeros(batch, c, h, w)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2]] = x
    expected = F.conv2d(dense, weight, bias, padding=3, groups=c)[sites[:, 0], :, sites[:, 1], sites[:, 2]]
    out = rows_dwconv(x.to(device), nbr.to(device), weight.to(device), bias.to(device), impl=name)
    assert_close(out.cpu(), expected, torch.float32, "output")


def test_dwconv_under_autocast_runs_in_the_autocast_dtype(impl):
    name, device = impl
    _, nbr = layout(8, seed=3)
    nbr = nbr.to(device)
    x = features(nbr.shape[0], 8, torch.float32, device, seed=3)  # fp32 in, as after an fp32 op
    weight, bias = torch.randn(8, 49).to(device), torch.randn(8).to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, grads, grad_out = run_with_grads(lambda x, w, b: rows_dwconv(x, nbr, w, b, impl=name), [x, weight, bias])
        ref, ref_grads, _ = run_with_grads(lambda x, w, b: rows_dwconv_reference(x, nbr, w, b), [x, weight, bias],
                                           grad_out)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output")
    for what, g, r in zip(["grad x", "grad weight", "grad bias"], grads, ref_grads):
        assert g.dtype == torch.float32, f"{what} reaches the fp32 leaf in fp32"
        assert_close(g, r, torch.bfloat16, what)


# -- LayerNorm --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("permuted", [False, True])
def test_layernorm_matches_reference(impl, dtype, permuted):
    name, device = impl
    for c in channel_counts(name, layernorm=True):
        m = 53
        x = features(m, c, dtype, device, seed=c, scale=3.0) + 1.0  # off-centre rows
        w, b = params(c, device, c, 2)
        out_rows = torch.randperm(m, generator=torch.Generator().manual_seed(c)).to(device) if permuted else None
        compare_with_reference(lambda x, w, b: rows_layernorm(x, w, b, LN_EPS, out_rows=out_rows, impl=name),
                               lambda x, w, b: rows_layernorm_reference(x, w, b, LN_EPS, out_rows=out_rows),
                               [x, w, b], dtype, ["x", "weight", "bias"])


# -- GRN with its prologue ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("prologue", ["none", "bias", "gelu", "bias+gelu"])
def test_grn_matches_reference(impl, dtype, prologue):
    name, device = impl
    lengths = [1, 20, 3, 13]  # unequal, one single-row sample
    offsets = offsets_from_lengths(lengths).to(device)
    for c in channel_counts(name):
        x = features(sum(lengths), c, dtype, device, seed=c)
        gamma, beta, input_bias = params(c, device, c, 3)
        with_bias, gelu = "bias" in prologue, "gelu" in prologue
        inputs = [x, gamma, beta] + ([input_bias] if with_bias else [])

        def op(x, g, b, *ib):
            return rows_grn(x, offsets, g, b, ib[0] if ib else None, gelu=gelu, eps=GRN_EPS, impl=name)

        def ref(x, g, b, *ib):
            return rows_grn_reference(x, offsets, g, b, ib[0] if ib else None, gelu=gelu, eps=GRN_EPS)

        compare_with_reference(op, ref, inputs, dtype, ["x", "gamma", "beta"] + (["input_bias"] if with_bias else []))


def test_grn_zero_norm_and_empty_segment(impl):
    """A channel all zero in a sample (norm 0) gets gradient 0 like torch's norm, not NaN; an
    empty sample is fine."""
    name, device = impl
    lengths, c = [5, 0, 7], 6
    offsets = offsets_from_lengths(lengths).to(device)
    x = torch.randn(sum(lengths), c, generator=torch.Generator().manual_seed(4))
    x[:5, 2] = 0.0
    gamma, beta = params(c, device, 4, 2)
    out, grads, grad_out = run_with_grads(lambda x, g, b: rows_grn(x, offsets, g, b, eps=GRN_EPS, impl=name),
                                          [x.to(device), gamma, beta])
    ref, ref_grads, _ = run_with_grads(lambda x, g, b: rows_grn_reference(x, offsets, g, b, eps=GRN_EPS),
                                       [x.to(device), gamma, beta], grad_out)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert_close(out, ref, torch.float32, "output")
    for what, g, r in zip(["grad x", "grad gamma", "grad beta"], grads, ref_grads):
        assert_close(g, r, torch.float32, what)


# -- residual epilogue ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float32, torch.bfloat16)])  # stream x, branch y
@pytest.mark.parametrize("with_scale", [False, True])
def test_residual_matches_reference(impl, dtypes, with_scale):
    name, device = impl
    x_dtype, y_dtype = dtypes
    lengths = [7, 1, 12]
    offsets = offsets_from_lengths(lengths).to(device)
    scale = torch.tensor([2.0, 0.0, 1.25], device=device) if with_scale else None  # one sample dropped
    for c in channel_counts(name):
        m = sum(lengths)
        x, y = features(m, c, x_dtype, device, seed=c), features(m, c, y_dtype, device, seed=c + 1)
        (bias,) = params(c, device, c, 1)
        out, grads, grad_out = run_with_grads(
            lambda x, y, b: rows_residual(x, y, b, scale, offsets if with_scale else None, impl=name), [x, y, bias])
        ref, ref_grads, _ = run_with_grads(
            lambda x, y, b: rows_residual_reference(x, y, b, scale, offsets if with_scale else None), [x, y, bias],
            grad_out)
        assert out.dtype == torch.promote_types(x_dtype, y_dtype)
        loose = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
        assert_close(out, ref, loose, "output")
        for what, g, r, dt in zip(["grad x", "grad y", "grad bias"], grads, ref_grads, [x_dtype, y_dtype, torch.float32]):
            assert_close(g, r, loose, what)
            assert g.dtype == dt, f"{what}: {g.dtype}"


# -- the references against dense torch (no kernels) ------------------------------------------------


def test_dwconv_reference_equals_dense_conv_at_visible_sites():
    """k = (dy+3)*7 + (dx+3) matches a dense (C, 1, 7, 7) weight; both weight shapes accepted."""
    batch, rows, cols, patch, c = 2, 4, 5, 2, 5
    sites = patch_aligned_sites(random_patch_mask(batch, rows, cols, ratio=0.6, seed=1), patch)
    h, w = rows * patch, cols * patch
    nbr = neighbour_map(sites, h, w)
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(sites.shape[0], c, generator=gen), torch.randn(c, 1, 7, 7, generator=gen), torch.randn(c)
    dense = torch.zeros(batch, c, h, w)
    dense[sites[:, 0], :, sites[:, 1], sites[:, 2]] = x
    expected = F.conv2d(dense, weight, bias, padding=3, groups=c)[sites[:, 0], :, sites[:, 1], sites[:, 2]]
    torch.testing.assert_close(rows_dwconv_reference(x, nbr, weight.view(c, 49), bias), expected)
    torch.testing.assert_close(rows_dwconv_reference(x, nbr, weight, bias), expected)


def test_grn_reference_equals_the_models_grn_on_a_zero_filled_map():
    batch, h, w, c = 3, 4, 6, 11
    sites = random_sites(batch, h, w, 29, seed=5)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(sites.shape[0], c, generator=gen)
    grn = GRN(c)
    with torch.no_grad():
        grn.weight.normal_(generator=gen)
        grn.bias.normal_(generator=gen)
    dense = torch.zeros(batch, h, w, c)
    dense[sites[:, 0], sites[:, 1], sites[:, 2]] = x
    expected = grn(dense)[sites[:, 0], sites[:, 1], sites[:, 2]]
    actual = rows_grn_reference(x, offsets_of_sites(sites, batch), grn.weight, grn.bias, eps=grn.eps)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)
    # the prologue is the model's Linear bias then nn.GELU() (exact)
    bias = torch.randn(c, generator=gen)
    dense_h = torch.zeros(batch, h, w, c)
    dense_h[sites[:, 0], sites[:, 1], sites[:, 2]] = x
    keep = torch.zeros(batch, h, w, 1)
    keep[sites[:, 0], sites[:, 1], sites[:, 2]] = 1
    expected = grn(torch.nn.GELU()(dense_h + bias) * keep)[sites[:, 0], sites[:, 1], sites[:, 2]]
    actual = rows_grn_reference(x, offsets_of_sites(sites, batch), grn.weight, grn.bias, bias, gelu=True, eps=grn.eps)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_layernorm_and_residual_references_are_the_plain_ops():
    x, y = torch.randn(9, 7), torch.randn(9, 7)
    w, b = torch.randn(7), torch.randn(7)
    perm = torch.randperm(9)
    z = rows_layernorm_reference(x, w, b, LN_EPS, out_rows=perm)
    torch.testing.assert_close(z[perm], F.layer_norm(x, (7,), w, b, 1e-6))
    scale, offsets = torch.tensor([0.5, 3.0]), offsets_from_lengths([4, 5])
    expected = x + (y + b) * torch.tensor([0.5] * 4 + [3.0] * 5)[:, None]
    torch.testing.assert_close(rows_residual_reference(x, y, b, scale, offsets), expected)
    torch.testing.assert_close(rows_residual_reference(x, y), x + y)


def test_dwconv_layernorm_reference_is_the_two_references():
    _, nbr = layout(6, seed=9)
    x = torch.randn(nbr.shape[0], 6)
    w, cb, lw, lb = torch.randn(6, 49), torch.randn(6), torch.randn(6), torch.randn(6)
    torch.testing.assert_close(rows_dwconv_layernorm_reference(x, nbr, w, cb, lw, lb, LN_EPS),
                               F.layer_norm(rows_dwconv_reference(x, nbr, w, cb), (6,), lw, lb, 1e-6))
