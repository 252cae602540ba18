"""The tile ops (sparse_mae_kernels.ops.tiles_*: the native engine's torch fallback)
against their plain-torch references and dense torch: output and every gradient, fp32 and
bf16 at paired tolerances, odd sizes."""
import pytest
import torch
import torch.nn.functional as F

from sparse_mae.backends.native.layout import SparseLayout
from sparse_mae.models.convnextv2 import GRN
from sparse_mae.models.geometry import GRN_EPS
from sparse_mae_kernels import use_triton
from sparse_mae_kernels.ops.tiles_dwconv import tiles_dwconv, tiles_dwconv_reference
from sparse_mae_kernels.ops.tiles_grn import tiles_grn, tiles_grn_reference
from tests.kernel_helpers import assert_close
from tests.kernel_helpers import odd_patch_mask as odd_mask

SIDES = {0: 8, 1: 4, 2: 2, 3: 1}


def dense_canvas_dwconv(x, layout: SparseLayout, s: int, weight, bias):
    """Independent check: scatter tiles to a zero canvas, dense conv, read tiles back."""
    n, (h, w) = layout.batch, layout.grid
    c = x.shape[-1]
    canvas = x.new_zeros(n, h, w, s, s, c)
    canvas[layout.patch_sample, layout.patch_y, layout.patch_x] = x
    canvas = canvas.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h * s, w * s)
    y = F.conv2d(canvas, weight, bias, padding=3, groups=c)
    y = y.reshape(n, c, h, s, w, s).permute(0, 2, 4, 3, 5, 1)
    return y[layout.patch_sample, layout.patch_y, layout.patch_x]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiles_dwconv_matches_reference(stage, dtype):
    torch.manual_seed(stage)
    layout = SparseLayout(odd_mask())
    st, s, c = layout.stage(stage), SIDES[stage], 13
    x = torch.randn(layout.num_patches, s, s, c)
    weight, bias = 0.15 * torch.randn(c, 1, 7, 7), torch.randn(c)  # outputs O(1), as in a trained net
    dy = torch.randn(layout.num_patches, s, s, c)

    def run(fn, cast):
        xs, ws, bs = (t.to(cast).requires_grad_() for t in (x, weight, bias))
        y = fn(xs, st.halo_index, ws, bs)
        y.backward(dy.to(cast))
        return [t.detach().float() for t in (y, xs.grad, ws.grad, bs.grad)]

    got = run(tiles_dwconv, dtype)
    ref = run(tiles_dwconv_reference, torch.float32)  # fp32 reference for both dtypes
    for name, g, r in zip(("out", "grad x", "grad weight", "grad bias"), got, ref):
        assert_close(g, r, dtype, name)


@pytest.mark.parametrize("stage", [0, 3])
def test_tiles_dwconv_reference_equals_masked_dense_conv(stage):
    layout = SparseLayout(odd_mask())
    s, c = SIDES[stage], 5
    x = torch.randn(layout.num_patches, s, s, c)
    weight, bias = torch.randn(c, 1, 7, 7), torch.randn(c)
    ref = tiles_dwconv_reference(x, layout.stage(stage).halo_index, weight, bias)
    torch.testing.assert_close(ref, dense_canvas_dwconv(x, layout, s, weight, bias), atol=1e-5, rtol=1e-5)


def test_tiles_dwconv_input_grad_only():
    layout = SparseLayout(odd_mask())
    x = torch.randn(layout.num_patches, 2, 2, 3, requires_grad=True)
    weight = torch.randn(3, 1, 7, 7)  # frozen: its gradient must not be asked for
    tiles_dwconv(x, layout.stage(2).halo_index, weight, None).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    tiles_dwconv_reference(x2, layout.stage(2).halo_index, weight, None).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sites", [1, 4, 64])
def test_tiles_grn_matches_reference(dtype, sites):
    torch.manual_seed(sites)
    layout = SparseLayout(odd_mask())
    p, c = layout.num_patches, 13
    x, gamma, beta = torch.randn(p, sites, c), torch.randn(c), torch.randn(c)
    dy = torch.randn(p, sites, c)

    def run(fn, cast):
        xs, gs, bs = (t.to(cast).requires_grad_() for t in (x, gamma, beta))
        y = fn(xs, layout.patch_sample, layout.batch, gs, bs, GRN_EPS)
        y.backward(dy.to(cast))
        return [t.detach().float() for t in (y, xs.grad, gs.grad, bs.grad)]

    got = run(tiles_grn, dtype)
    ref = run(tiles_grn_reference, torch.float32)
    for name, g, r in zip(("out", "grad x", "grad gamma", "grad beta"), got, ref):
        assert_close(g, r, dtype, name)


def test_tiles_grn_equals_dense_grn_including_zero_channels():
    """All patches visible -> the model's dense GRN; an all-zero channel has gradient 0 (not NaN)."""
    torch.manual_seed(0)
    n, h, w, c = 2, 3, 5, 7
    x = torch.randn(n, h, w, c)
    x[..., 2] = 0.0
    grn = GRN(c)
    with torch.no_grad():
        grn.weight.normal_()
        grn.bias.normal_()
    xd = x.clone().requires_grad_()
    grn(xd).square().sum().backward()
    layout = SparseLayout(torch.zeros(n, h, w))
    xs = x.reshape(n * h * w, 1, c).clone().requires_grad_()  # one site per patch, sample-major
    gamma, beta = grn.weight.detach().clone().requires_grad_(), grn.bias.detach().clone().requires_grad_()
    tiles_grn(xs, layout.patch_sample, n, gamma, beta, grn.eps).square().sum().backward()
    assert torch.isfinite(xs.grad).all()
    torch.testing.assert_close(xs.grad.view(n, h, w, c), xd.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gamma.grad, grn.weight.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(beta.grad, grn.bias.grad, atol=1e-5, rtol=1e-4)


def test_neighbour_map_matches_halo():
    layout = SparseLayout(odd_mask())
    for stage, s in SIDES.items():
        st = layout.stage(stage)
        nbr = st.neighbour_map()
        m = layout.num_patches * s * s
        assert nbr.shape == (m, 49) and nbr.dtype == torch.int32
        assert torch.equal(nbr[:, 24].long(), torch.arange(m))  # centre offset = the site itself
        assert int(nbr.min()) == -1 and int(nbr.max()) < m
        # offset (dy, dx) = (0, +1) is k = 3*7 + 4; within a tile row it is the next row number
        if s > 1:
            right = nbr.view(layout.num_patches, s, s, 49)[:, :, :-1, 25].long()
            own = torch.arange(m).view(layout.num_patches, s, s)[:, :, 1:]
            assert torch.equal(right, own)
    assert torch.equal(layout.stage(0).row_offsets, torch.tensor([0, 3 * 64, 5 * 64]))


def test_bad_shapes_raise():
    layout = SparseLayout(odd_mask())
    x = torch.randn(layout.num_patches, 2, 2, 3)
    with pytest.raises(ValueError, match="halo_index"):
        tiles_dwconv(x, layout.stage(1).halo_index, torch.randn(3, 1, 7, 7))
    with pytest.raises(ValueError, match="depthwise weight"):
        tiles_dwconv(x, layout.stage(2).halo_index, torch.randn(4, 1, 7, 7))
    with pytest.raises(ValueError, match="gamma"):
        tiles_grn(x.view(layout.num_patches, 4, 3), layout.patch_sample, 2, torch.zeros(4), torch.zeros(3), GRN_EPS)
    with pytest.raises(ValueError, match="sample-major"):
        tiles_grn(x.view(layout.num_patches, 4, 3), layout.patch_sample.flip(0), 2, torch.zeros(3), torch.zeros(3),
                  GRN_EPS)
    with pytest.raises(ValueError, match="keeps 0 patches"):
        SparseLayout(torch.ones(1, 2, 2))


def test_use_triton_switch(monkeypatch):
    assert not use_triton("cpu")
    monkeypatch.setenv("SPARSE_MAE_TRITON", "0")
    assert not use_triton("cuda")
