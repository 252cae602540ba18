"""ResNet encoders on the sparse backends (`encode_stages`): dense_masked and native against the
independent SparK reference (tests/spark_reference.py) in features, every gradient and the
BatchNorm running statistics; the gather conv against torch's dense conv; the geometry of
the packed grids."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparse_mae.backends import get_backend
from sparse_mae.backends.native.resnet import ResNetLayout, rows_gather_conv
from sparse_mae.models.geometry import PATCH, STAGE_STRIDES
from sparse_mae.models.resnet import build_resnet
from sparse_mae.models.sparse_norm import convert_sync_batchnorm
from tests.equivalence import BF16_GRAD_NORM_RTOL, relative_norm
from tests.spark_reference import reference_stages

BACKENDS = ["dense_masked", "native"]
# resnet50 in float64: with random BatchNorm affines and a random weighting of every feature
# site, its float32 gradients are ~0.6% from float64 in the reference itself (measured)
VARIANTS = [("resnet_debug", torch.float32), ("resnet18", torch.float32),
            pytest.param("resnet50", torch.float64, marks=pytest.mark.slow)]
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-9, 1e-9)}  # features, gradients (of max |.|)


def encoder_with_random_norms(variant: str, seed: int = 0) -> nn.Module:
    """A ResNet whose BatchNorms are not at their (1, 0) / zero-init start, so that every
    branch carries signal and every gradient is exercised."""
    torch.manual_seed(seed)
    enc = build_resnet(variant, num_classes=0)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return enc


def random_mask(n: int, h: int, w: int, ratio: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    keep = max(1, int(h * w * (1 - ratio)))
    ids = torch.rand(n, h * w, generator=g).argsort(1)[:, :keep]
    return torch.ones(n, h * w).scatter_(1, ids, 0.0).view(n, h, w)


def run(fn, enc: nn.Module, imgs: torch.Tensor, mask: torch.Tensor, weights: list[torch.Tensor]):
    """features, parameter gradients, image gradient and buffers after one forward/backward of
    the weighted feature sum (every stage's features reach the loss, as SparK's decoder reads them)."""
    imgs = imgs.clone().requires_grad_()
    feats = fn(enc, imgs, mask)
    loss = sum((f.to(w.dtype) * w).sum() for f, w in zip(feats, weights))
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in enc.named_parameters()}
    return [f.detach() for f in feats], grads, imgs.grad, {k: b.clone() for k, b in enc.named_buffers()}


def reference_fn(training: bool):
    def fn(enc, imgs, mask):
        return reference_stages(dict(enc.named_parameters()), dict(enc.named_buffers()), imgs, mask, training)
    return fn


def backend_fn(name: str):
    backend = get_backend(name)
    return lambda enc, imgs, mask: backend.encode_stages(enc, imgs, mask)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str):
    """max |a - b| within rtol of max |b| (gradients of deep nets vary in scale across tensors)."""
    scale = b.abs().max().item()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("variant,dtype", VARIANTS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_backend_equals_reference(backend, variant, dtype, training):
    size = (96, 160)  # odd: 3 x 5 patches
    feature_tol, grad_tol = TOLERANCES[dtype]
    enc = encoder_with_random_norms(variant).train(training).to(dtype)
    imgs = torch.randn(3, 3, *size, dtype=dtype)
    mask = random_mask(3, size[0] // PATCH, size[1] // PATCH, 0.6, seed=1)
    shapes = [(3, c, size[0] // s, size[1] // s) for c, s in zip(enc.stage_dims, STAGE_STRIDES)]
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype) for i, s in enumerate(shapes)]
    ref = run(reference_fn(training), copy.deepcopy(enc), imgs, mask, weights)
    got = run(backend_fn(backend), copy.deepcopy(enc), imgs, mask, weights)
    for i, (f, r) in enumerate(zip(got[0], ref[0])):
        assert f.shape == r.shape == shapes[i]
        assert_close_rel(f, r, feature_tol, f"stage {i} features")
        removed = (mask == 1).repeat_interleave(PATCH // STAGE_STRIDES[i], 1).repeat_interleave(
            PATCH // STAGE_STRIDES[i], 2)
        assert torch.count_nonzero(f.permute(1, 0, 2, 3)[:, removed]) == 0, "features must be exactly 0 where removed"
    for k in ref[1]:
        assert_close_rel(got[1][k], ref[1][k], grad_tol, f"grad {k}")
    assert_close_rel(got[2], ref[2], grad_tol, "image grad")
    for k in ref[3]:
        assert torch.allclose(got[3][k].double(), ref[3][k].double(), rtol=1e-4, atol=1e-5), f"buffer {k}"


@pytest.mark.parametrize("variant", ["resnet_debug", "resnet18"])
def test_backends_agree_under_bf16_autocast(variant):
    """bf16 autocast in both backends against the fp32 reference, at the bf16 tolerance of
    tests/equivalence.py (relative norm of each stage's features)."""
    size = (96, 96)
    enc = encoder_with_random_norms(variant)
    imgs = torch.randn(4, 3, *size)
    mask = random_mask(4, size[0] // PATCH, size[1] // PATCH, 0.5, seed=2)
    shapes = [(4, c, size[0] // s, size[1] // s) for c, s in zip(enc.stage_dims, STAGE_STRIDES)]
    weights = [torch.randn(s, generator=torch.Generator().manual_seed(i)) for i, s in enumerate(shapes)]
    ref = run(reference_fn(True), copy.deepcopy(enc), imgs, mask, weights)
    for backend in BACKENDS:
        fn = backend_fn(backend)

        def autocast_fn(e, x, m, fn=fn):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(e, x, m)

        got = run(autocast_fn, copy.deepcopy(enc), imgs, mask, weights)
        for i, (f, r) in enumerate(zip(got[0], ref[0])):
            assert relative_norm(f, r) <= BF16_GRAD_NORM_RTOL, f"{backend} stage {i} features"
        # gradients: at the SparK loss, tests/test_spark.py (a random weighting of every feature
        # site cancels most of each BN gradient, which leaves bf16 rounding on top)
        for k in ref[1]:
            assert bool(torch.isfinite(got[1][k]).all()), f"{backend} grad {k} is not finite"


@pytest.mark.parametrize("convert", [nn.SyncBatchNorm.convert_sync_batchnorm, convert_sync_batchnorm],
                         ids=["torch", "ours"])
def test_sync_batch_norm_encoder_runs_on_both_backends(convert):
    """A SyncBatchNorm goes through the same row BatchNorm; without a process group it is a
    BatchNorm over the visible sites, the reference's numbers (the all-reduce:
    tests/test_sparse_norm.py)."""
    enc = convert(encoder_with_random_norms("resnet_debug"))
    imgs = torch.randn(2, 3, 64, 64)
    mask = random_mask(2, 2, 2, 0.5, seed=3)
    ref = reference_stages(dict(enc.named_parameters()), dict(copy.deepcopy(enc).named_buffers()), imgs, mask)
    for backend in BACKENDS:
        got = get_backend(backend).encode_stages(copy.deepcopy(enc), imgs, mask)
        for f, r in zip(got, ref):
            assert_close_rel(f.detach(), r.detach(), 1e-5, backend)


@pytest.mark.parametrize("kernel,stride", [(7, 2), (3, 1), (3, 2), (1, 2)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_rows_gather_conv_equals_dense_conv_when_every_site_is_visible(kernel, stride, dtype, tol):
    """Every patch visible: the gather conv over the neighbour map is the dense conv with
    zero padding, on an odd grid (3 x 5 patches); outputs and both gradients."""
    n, c_in, c_out, side = 2, 5, 7, 4
    mask = torch.zeros(n, 3, 5)
    layout = ResNetLayout(mask)
    x = torch.randn(n, c_in, 3 * side, 5 * side, dtype=dtype, requires_grad=True)
    w = torch.randn(c_out, c_in, kernel, kernel, dtype=dtype, requires_grad=True)
    dense = F.conv2d(x, w, stride=stride, padding=kernel // 2)
    rows_in = layout.densify  # packed (patch, y, x) rows <-> the dense map
    sample, ys, xs = layout._site_coords(side)
    x_rows = x.permute(0, 2, 3, 1)[sample.reshape(-1), ys.reshape(-1), xs.reshape(-1)]
    out = rows_gather_conv(x_rows, layout.neighbours(side, kernel, stride), w)
    got = rows_in(out, side // stride)
    assert got.shape == dense.shape
    assert_close_rel(got, dense, tol, "output")
    g = torch.randn_like(dense)
    gx, gw = torch.autograd.grad(dense, (x, w), g)
    hx, hw = torch.autograd.grad(got, (x, w), g)
    assert_close_rel(hx, gx, tol, "grad x")
    assert_close_rel(hw, gw, tol, "grad weight")


def test_neighbour_maps_keep_each_patch_within_the_visible_set():
    """The geometry of docs/design.md: every output site of conv1 (7x7/2), the max-pool (3x3/2)
    and a strided 3x3 reads its own patch's site (t*y, t*x); taps outside the visible patches
    are -1, never a row of another sample."""
    mask = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]])
    layout = ResNetLayout(mask)
    for side, k, t in [(32, 7, 2), (16, 3, 2), (8, 3, 2), (8, 3, 1), (8, 1, 2)]:
        nbr = layout.neighbours(side, k, t)
        per_patch_in, per_patch_out = side * side, (side // t) ** 2
        assert nbr.shape == (3 * per_patch_out, k * k)
        centre = nbr[:, (k // 2) * k + k // 2]
        out_patch = torch.arange(nbr.shape[0]) // per_patch_out
        assert torch.equal(centre.long() // per_patch_in, out_patch)  # the centre tap: same patch
        sample_of_patch = torch.tensor([0, 0, 1])
        valid = nbr >= 0
        assert torch.equal(sample_of_patch[nbr[valid].long() // per_patch_in],
                           sample_of_patch[out_patch].view(-1, 1).expand_as(nbr)[valid])


def test_a_backend_without_resnets_refuses_clearly():
    """The interface's default (minkowski's until it runs ResNets) names the backends that can."""
    from sparse_mae.backends.base import EncoderBackend

    with pytest.raises(NotImplementedError, match="backend=dense_masked or backend=native"):
        EncoderBackend().encode_stages(build_resnet("resnet_debug", num_classes=0), torch.randn(1, 3, 64, 64),
                                       torch.zeros(1, 2, 2))
