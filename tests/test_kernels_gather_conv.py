"""The gathered convolution of a sparse ResNet (sparse_mae_kernels.ops.rows_gather_conv) against
its plain-torch reference and against F.conv2d on a dense zero-filled map: the C kernels and
the Triton kernels (in Triton's CPU interpreter without a GPU), output and every gradient,
float32 and bfloat16 at paired tolerances. Every conv of a ResNet: the submanifold 3x3 (with
and without its transposed map), 3x3 and 1x1 stride 2, the 7x7 stride-2 stem, 1x1; odd
channel counts (3, 17, 67: partial vectors and channel blocks), row counts no block divides,
empty maps, rows whose taps are all absent; the map builder, and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparse_mae_kernels import cpu_build
from sparse_mae_kernels.ops.rows_gather_conv import (
    gather_conv_map,
    rows_gather_conv,
    rows_gather_conv_reference,
    transpose_map,
)
from tests.kernel_helpers import (
    assert_close,
    compare_with_reference,
    patch_aligned_sites,
    random_patch_mask,
    run_with_grads,
)
from tests.test_kernels_rows import impl  # noqa: F401  (the fixture: C, Triton in the interpreter, Triton on CUDA)

# (kernel, stride): the convs of a ResNet
CONVS = {"3x3": (3, 1), "3x3 s2": (3, 2), "1x1 s2": (1, 2), "7x7 s2": (7, 2), "1x1": (1, 1)}


def level(batch: int, height: int, width: int, keep: float, seed: int) -> torch.Tensor:
    """Random sites (sample, y, x) of a batch x height x width grid, about `keep` of them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nonzero(torch.rand(batch, height, width, generator=gen) < keep)


def conv_case(conv: str, seed: int = 0, height: int = 9, width: int = 7):
    """(coords_out, coords_in, nbr, kernel, stride, grid in, grid out) of an irregular layout."""
    kernel, stride = CONVS[conv]
    coords_in = level(2, height, width, 0.55, seed)
    out_h, out_w = (height - 1) // stride + 1, (width - 1) // stride + 1  # odd kernel, padding kernel // 2
    coords_out = coords_in if stride == 1 else level(2, out_h, out_w, 0.6, seed + 1)
    nbr = gather_conv_map(coords_out, coords_in, kernel, stride)
    return coords_out, coords_in, nbr, kernel, stride, (height, width), (out_h, out_w)


def features(m: int, c: int, dtype, device, seed: int) -> torch.Tensor:
    return torch.randn(m, c, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def conv_weight(c_out: int, c_in: int, kernel: int, device, seed: int) -> torch.Tensor:
    scale = (c_in * kernel * kernel) ** -0.5  # unit-sized outputs, so the tolerances mean the same at every size
    return (scale * torch.randn(c_out, c_in, kernel, kernel, generator=torch.Generator().manual_seed(seed))).to(device)


def channel_pairs(impl_name: str) -> list[tuple[int, int]]:
    # the interpreter is slow: fewer sizes there, still odd ones
    return [(3, 17), (17, 67), (67, 3)] if impl_name == "c" else [(3, 17), (67, 3)]


def dense_map(x: torch.Tensor, coords: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Rows x at coords on a zero-filled (batch, C, H, W) map."""
    dense = x.new_zeros(batch, *grid, x.shape[1]).index_put((coords[:, 0], coords[:, 1], coords[:, 2]), x)
    return dense.permute(0, 3, 1, 2)


# -- against the reference ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("conv", list(CONVS))
def test_matches_reference(impl, dtype, conv):
    name, device = impl
    coords_out, coords_in, nbr, kernel, stride, _, _ = conv_case(conv, seed=len(conv))
    nbr = nbr.to(device)
    assert nbr.shape[0] % 32 and (conv == "1x1" or bool((nbr == -1).any()))  # rows no block divides, absent taps
    transposed_maps = [None, nbr.flip(1) if stride == 1 else transpose_map(nbr, coords_in.shape[0])]
    for (c_in, c_out), transposed in zip(channel_pairs(name), transposed_maps * 2):
        x = features(coords_in.shape[0], c_in, dtype, device, seed=c_in)
        weight = conv_weight(c_out, c_in, kernel, device, seed=c_out)  # fp32 master weight
        compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w, transposed=transposed, impl=name),
                               lambda x, w: rows_gather_conv_reference(x, nbr, w), [x, weight], dtype, ["x", "weight"])


def test_submanifold_with_and_without_transposed_map_agree(impl):
    """The two input-gradient paths (gather through nbr.flip(1), or scatter / built transpose)."""
    name, device = impl
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3", seed=5)
    nbr = nbr.to(device)
    x = features(coords_in.shape[0], 17, torch.float32, device, seed=1)
    weight = conv_weight(5, 17, 3, device, seed=2)
    _, (gx, gw), grad_out = run_with_grads(lambda x, w: rows_gather_conv(x, nbr, w, impl=name), [x, weight])
    _, (gx_t, gw_t), _ = run_with_grads(lambda x, w: rows_gather_conv(x, nbr, w, transposed=nbr.flip(1), impl=name),
                                        [x, weight], grad_out)
    assert_close(gx_t, gx, torch.float32, "grad x")
    assert_close(gw_t, gw, torch.float32, "grad weight")


def test_empty_maps_and_rows_with_no_site(impl):
    name, device = impl
    weight = conv_weight(6, 5, 3, device, seed=0)
    # no output rows
    x = features(7, 5, torch.float32, device, seed=0)
    empty = torch.empty(0, 9, dtype=torch.int32, device=device)
    out, (gx, gw), _ = run_with_grads(lambda x, w: rows_gather_conv(x, empty, w, impl=name), [x, weight])
    assert out.shape == (0, 6) and bool((gx == 0).all()) and bool((gw == 0).all())
    # no input rows: every tap absent, the output zero
    absent = torch.full((4, 9), -1, dtype=torch.int32, device=device)
    x0 = features(0, 5, torch.float32, device, seed=0)
    out, (gx, gw), _ = run_with_grads(lambda x, w: rows_gather_conv(x, absent, w, impl=name), [x0, weight])
    assert out.shape == (4, 6) and bool((out == 0).all()) and gx.shape == (0, 5) and bool((gw == 0).all())
    # some rows with every tap absent among ordinary ones
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3 s2", seed=3)
    nbr = torch.cat([nbr, torch.full((3, 9), -1, dtype=torch.int32)]).to(device)
    x = features(coords_in.shape[0], 5, torch.float32, device, seed=1)
    compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w, impl=name),
                           lambda x, w: rows_gather_conv_reference(x, nbr, w), [x, weight], torch.float32,
                           ["x", "weight"])
    assert bool((rows_gather_conv(x, nbr, weight, impl=name)[-3:] == 0).all())


def test_frozen_weight_and_input_without_grad(impl):
    """Only one gradient asked for: the stem's input (the image) needs none, a frozen conv's
    weight none."""
    name, device = impl
    _, coords_in, nbr, _, _, _, _ = conv_case("7x7 s2", seed=4)
    nbr = nbr.to(device)
    x = features(coords_in.shape[0], 3, torch.float32, device, seed=0)
    weight = conv_weight(4, 3, 7, device, seed=1)
    for needs_x in (True, False):
        xs, ws = x.clone().requires_grad_(needs_x), weight.clone().requires_grad_(not needs_x)
        xr, wr = x.clone().requires_grad_(needs_x), weight.clone().requires_grad_(not needs_x)
        grad = torch.randn(nbr.shape[0], 4).to(device)
        rows_gather_conv(xs, nbr, ws, impl=name).backward(grad)
        rows_gather_conv_reference(xr, nbr, wr).backward(grad)
        leaf, ref = (xs, xr) if needs_x else (ws, wr)
        assert_close(leaf.grad, ref.grad, torch.float32, "the one gradient")
        assert (ws if needs_x else xs).grad is None


# -- against dense torch -----------------------------------------------------------------------


@pytest.mark.parametrize("conv", list(CONVS))
def test_reference_is_a_conv2d_on_the_zero_filled_map(conv):
    """The reference (and the map builder) against F.conv2d on the dense map with absent sites
    zero, read at the output sites: output, and both gradients."""
    coords_out, coords_in, nbr, kernel, stride, grid_in, _ = conv_case(conv, seed=9, height=11, width=10)
    x, weight = features(coords_in.shape[0], 6, torch.float32, "cpu", seed=1), conv_weight(5, 6, kernel, "cpu", seed=2)

    def dense(x, w):
        y = F.conv2d(dense_map(x, coords_in, 2, grid_in), w, stride=stride, padding=kernel // 2)
        return y.permute(0, 2, 3, 1)[coords_out[:, 0], coords_out[:, 1], coords_out[:, 2]]

    compare_with_reference(lambda x, w: rows_gather_conv_reference(x, nbr, w), dense, [x, weight], torch.float32,
                           ["x", "weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_are_a_conv2d_on_a_patch_aligned_layout(impl, dtype):
    """A ResNet's own geometry, scaled down: visible patches of 8 x 8 sites (2 x 3 patches per
    sample), the stem's 7x7 stride 2 to 4 x 4 sites per patch, a submanifold 3x3 there; each
    against F.conv2d on the zero-filled map."""
    name, device = impl
    mask = random_patch_mask(3, 2, 3, ratio=0.5, seed=1)
    fine, coarse = patch_aligned_sites(mask, 8), patch_aligned_sites(mask, 4)
    for coords_out, coords_in, kernel, stride, grid_in, c_in, c_out in (
            (coarse, fine, 7, 2, (16, 24), 3, 16), (coarse, coarse, 3, 1, (8, 12), 16, 17)):
        nbr = gather_conv_map(coords_out, coords_in, kernel, stride).to(device)
        x = features(coords_in.shape[0], c_in, dtype, device, seed=c_in)
        weight = conv_weight(c_out, c_in, kernel, device, seed=c_out)
        idx_in, idx_out = coords_in.to(device), coords_out.to(device)

        def dense(x, w, idx_in=idx_in, idx_out=idx_out, grid_in=grid_in, kernel=kernel, stride=stride):
            y = F.conv2d(dense_map(x.float(), idx_in, 3, grid_in), w, stride=stride, padding=kernel // 2)
            return y.permute(0, 2, 3, 1)[idx_out[:, 0], idx_out[:, 1], idx_out[:, 2]].to(x.dtype)

        compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w, impl=name), dense, [x, weight], dtype,
                               ["x", "weight"])


def test_autocast_casts_the_features_as_a_dense_conv_would():
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3 s2", seed=6)
    x, weight = features(coords_in.shape[0], 17, torch.float32, "cpu", seed=0), conv_weight(5, 17, 3, "cpu", seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rows_gather_conv(x, nbr, weight)
        ref = rows_gather_conv_reference(x, nbr, weight)
        dense_dtype = F.conv2d(torch.zeros(1, 17, 3, 3), weight).dtype
    assert out.dtype == ref.dtype == dense_dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output under autocast")


# -- the C kernels -----------------------------------------------------------------------------

needs_c = pytest.mark.skipif(not cpu_build.available(), reason=f"C kernels: {cpu_build.unavailable_reason()}")


@needs_c
@pytest.mark.parametrize("threads", [1, 3])
def test_any_thread_count_gives_the_references_numbers(threads):
    coords_in = level(2, 30, 30, 0.5, seed=2)  # enough rows to split over threads
    for kernel, stride in ((3, 2), (3, 1)):
        coords_out = coords_in if stride == 1 else level(2, 15, 15, 0.6, seed=3)
        nbr = gather_conv_map(coords_out, coords_in, kernel, stride)
        x, weight = features(coords_in.shape[0], 40, torch.float32, "cpu", 0), conv_weight(33, 40, kernel, "cpu", 1)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(threads)
            compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w),
                                   lambda x, w: rows_gather_conv_reference(x, nbr, w), [x, weight], torch.float32,
                                   ["x", "weight"])
        finally:
            torch.set_num_threads(before)


@needs_c
def test_float16_runs_through_float32():
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3", seed=7)
    x, weight = features(coords_in.shape[0], 9, torch.float16, "cpu", 0), conv_weight(4, 9, 3, "cpu", 1)
    compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w), lambda x, w: rows_gather_conv_reference(x, nbr, w),
                           [x, weight], torch.float16, ["x", "weight"])


# -- the map builder and bad input -----------------------------------------------------------------


def test_map_taps_are_in_a_dense_weights_order():
    """Site (0, 2, 2) of a full 5 x 5 grid: tap ky * 3 + kx reads (2 + ky - 1, 2 + kx - 1); at
    stride 2 output (0, 1, 1) reads (1 + ky, 1 + kx); off the grid is -1."""
    grid = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(5), torch.arange(5),
                                      indexing="ij"), -1).reshape(-1, 3)
    row = {tuple(c.tolist()): i for i, c in enumerate(grid)}
    nbr = gather_conv_map(grid, grid, 3)
    assert nbr[row[(0, 2, 2)]].tolist() == [row[(0, 2 + ky - 1, 2 + kx - 1)] for ky in range(3) for kx in range(3)]
    assert nbr[row[(0, 0, 0)]].tolist()[:4] == [-1, -1, -1, -1]
    strided = gather_conv_map(torch.tensor([[0, 1, 1]]), grid, 3, stride=2)
    assert strided[0].tolist() == [row[(0, 1 + ky, 1 + kx)] for ky in range(3) for kx in range(3)]
    assert torch.equal(transpose_map(nbr, 25), nbr.flip(1))  # submanifold: the transpose flips the taps


def test_bad_input_is_a_clear_error():
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3", seed=8)
    m = coords_in.shape[0]
    x, weight = torch.randn(m, 4), torch.randn(5, 4, 3, 3)
    with pytest.raises(ValueError, match="one column per tap"):
        rows_gather_conv(x, nbr[:, :4], weight)
    with pytest.raises(ValueError, match="int32"):
        rows_gather_conv(x, nbr.long(), weight)
    with pytest.raises(ValueError, match=r"C_in = 4"):
        rows_gather_conv(x, nbr, torch.randn(5, 3, 3, 3))
    with pytest.raises(ValueError, match="dense conv weight"):
        rows_gather_conv(x, nbr, torch.randn(5, 36))
    with pytest.raises(ValueError, match="packed rows"):
        rows_gather_conv(x[None], nbr, weight)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        rows_gather_conv(x.long(), nbr, weight)
    too_far = nbr.clone()
    too_far[0, 0] = m
    for check_values in (None, False):  # the C kernels check the range always
        with pytest.raises(ValueError, match=rf"rows of x in \[0, {m}\)"):
            rows_gather_conv(x, too_far, weight, check_values=check_values)
    below = nbr.clone()
    below[1, 1] = -2
    with pytest.raises(ValueError, match="or -1 for an absent site"):
        rows_gather_conv(x, below, weight)
    with pytest.raises(ValueError, match="not nbr's transpose"):
        rows_gather_conv(x, nbr, weight, transposed=nbr)
    with pytest.raises(ValueError, match=r"transposed must be \(" + str(m)):
        rows_gather_conv(x, nbr, weight, transposed=nbr[:-1])
    with pytest.raises(ValueError, match="impl must be"):
        rows_gather_conv(x, nbr, weight, impl="cuda")


def test_map_builder_refuses_what_is_not_a_set_of_sites():
    sites = torch.tensor([[0, 1, 1], [0, 1, 2]])
    with pytest.raises(ValueError, match="coords_in must hold each site once"):
        gather_conv_map(sites, torch.cat([sites, sites[:1]]), 3)
    with pytest.raises(ValueError, match="coords_out must hold each site once"):
        gather_conv_map(torch.cat([sites, sites[:1]]), sites, 3)
    with pytest.raises(ValueError, match=r"\(M, 3\) integer"):
        gather_conv_map(sites.float(), sites, 3)
    with pytest.raises(ValueError, match=">= 0"):
        gather_conv_map(sites - 2, sites, 3)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        gather_conv_map(sites, sites, 3, stride=0)
    # a map that reads one input row from two outputs at one tap is no conv's
    with pytest.raises(ValueError, match="not a convolution's map"):
        transpose_map(torch.tensor([[0], [0]], dtype=torch.int32), 1)


def test_non_contiguous_inputs_are_made_contiguous(impl):
    name, device = impl
    _, coords_in, nbr, _, _, _, _ = conv_case("3x3 s2", seed=10)
    nbr = nbr.to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(coords_in.shape[0], 2 * 17, generator=gen).to(device)[:, ::2]  # strided view
    weight = torch.randn(5, 17, 3, 3, generator=gen).to(device).transpose(2, 3)  # a permuted view
    assert not x.is_contiguous() and not weight.is_contiguous()
    assert_close(rows_gather_conv(x, nbr, weight, impl=name),
                 rows_gather_conv_reference(x.contiguous(), nbr, weight.contiguous()), torch.float32, "output")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_resnet_sized_layouts(dtype):
    """ResNet-50-like sizes on a real patch layout (many row tiles, weight-gradient chunks and
    channel blocks): layer1's submanifold 3x3 and layer2's 3x3 stride 2."""
    mask = random_patch_mask(4, 7, 7, ratio=0.6, seed=11)
    fine, coarse = patch_aligned_sites(mask, 8), patch_aligned_sites(mask, 4)
    for coords_out, coords_in, stride, c_in, c_out in ((fine, fine, 1, 64, 64), (coarse, fine, 2, 128, 128)):
        nbr = gather_conv_map(coords_out, coords_in, 3, stride).cuda()
        x = features(coords_in.shape[0], c_in, dtype, "cuda", seed=c_in)
        weight = conv_weight(c_out, c_in, 3, "cuda", seed=c_out)
        compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w, impl="triton"),
                               lambda x, w: rows_gather_conv_reference(x, nbr, w), [x, weight], dtype, ["x", "weight"])


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_c_forwards_match_the_reference(monkeypatch, dtype):
    """The C forward runs the fused gather-GEMM for a small weight (every case above, where this
    build has it) and the gather + oneDNN's GEMM for a large one: the latter forced here."""
    from sparse_mae_kernels.ops import rows_gather_conv as gc

    for fused_max in (gc.FUSED_MAX_WEIGHT_BYTES, dict.fromkeys(gc.FUSED_MAX_WEIGHT_BYTES, 0)):
        monkeypatch.setattr(gc, "FUSED_MAX_WEIGHT_BYTES", fused_max)
        for conv in CONVS:
            _, coords_in, nbr, kernel, stride, _, _ = conv_case(conv, seed=12)
            transposed = nbr.flip(1) if stride == 1 else None
            for c_in, c_out in channel_pairs("c"):
                x = features(coords_in.shape[0], c_in, dtype, "cpu", seed=c_in)
                weight = conv_weight(c_out, c_in, kernel, "cpu", seed=c_out)
                compare_with_reference(lambda x, w: rows_gather_conv(x, nbr, w, transposed=transposed),
                                       lambda x, w: rows_gather_conv_reference(x, nbr, w), [x, weight], dtype,
                                       ["x", "weight"])
