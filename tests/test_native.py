"""backend="native" equals the dense_masked reference (and minkowski where installed)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sparse_mae.backends import backend_availability, get_backend, list_backends
from sparse_mae.flops import fcmae_gmacs
from tests.equivalence import assert_batch_independent, assert_same_as_reference, make_case, run_step


def minkowski_available() -> tuple[bool, str]:
    if "minkowski" not in list_backends():
        return False, "minkowski backend not registered"
    return backend_availability("minkowski")


@pytest.fixture(params=["c", "torch"])
def kernel_path(request, monkeypatch):
    """Run a case with the C kernels (default) and with the engine's torch-op fallback."""
    if request.param == "torch":
        monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", "0")
    return request.param


@pytest.mark.parametrize("mask_ratio", [0.25, 0.6, 0.9])
def test_debug_equals_reference(mask_ratio, kernel_path):
    model, imgs, mask = make_case("debug", (96, 96), 3, mask_ratio)
    assert_same_as_reference(model, imgs, mask, "native")


def test_non_square_input(kernel_path):
    model, imgs, mask = make_case("debug", (160, 96), 3, 0.6, seed=1)
    assert_same_as_reference(model, imgs, mask, "native")


def test_patch_row_and_column_masked_in_every_sample():
    """The last grid row and first column are removed everywhere: the map keeps its shape."""
    model, imgs, mask = make_case("debug", (128, 96), 3, 0.25, seed=2)
    grid = mask.view(3, 4, 3).clone()
    grid[:, -1, :] = 1
    grid[:, :, 0] = 1
    grid[:, 0, 1] = 0  # keep at least one patch per sample
    mask = grid.view(3, -1)
    pred, _ = assert_same_as_reference(model, imgs, mask, "native")
    latent = model.forward_encoder(imgs, mask)
    assert latent.shape == (3, model.encoder.dims[-1], 4, 3)
    assert torch.count_nonzero(latent[:, :, -1, :]) == 0


def test_different_visible_counts_per_sample():
    model, imgs, mask = make_case("debug", (96, 128), 3, 0.5, seed=3)
    grid = torch.ones(3, 12)
    grid[0, :1] = 0  # 1 visible patch
    grid[1, ::2] = 0  # 6
    grid[2, :11] = 0  # 11
    assert_same_as_reference(model, imgs, grid, "native")


def test_batch_independence(kernel_path):
    model, imgs, mask = make_case("debug", (96, 96), 3, 0.6, seed=4)
    assert_batch_independent(model, imgs, mask, "native")


def test_drop_path_in_train_mode():
    model, imgs, mask = make_case("debug", (96, 96), 4, 0.6, seed=5, drop_path_rate=0.5)
    model.train()
    assert_same_as_reference(model, imgs, mask, "native")
    # the draws really drop something: another RNG seed changes the loss
    model.set_backend(get_backend("native"))
    loss_a = run_step(model, imgs, mask, rng_seed=1)[0]
    loss_b = run_step(model, imgs, mask, rng_seed=2)[0]
    assert not torch.equal(loss_a, loss_b)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.5])
def test_bf16_equals_reference_in_bf16(kernel_path, drop_path_rate):
    """Under bf16 autocast the loss and every gradient equal dense_masked's in bf16 (the C
    kernels keep activations in bf16 between the matmuls; the torch fallback casts)."""
    model, imgs, mask = make_case("debug", (96, 96), 3, 0.6, seed=11, drop_path_rate=drop_path_rate)
    model.train()
    assert_same_as_reference(model, imgs, mask, "native", dtype=torch.bfloat16)


def test_bf16_activations_stay_bf16_between_the_kernels():
    """No casts around the kernels: the latent comes out of the encoder in bf16, and no op of the
    encoder's forward converts a bf16 activation to fp32 (only fp32 weights go to bf16)."""
    model, imgs, mask = make_case("debug", (96, 96), 2, 0.6, seed=12)
    model.set_backend(get_backend("native"))
    to_fp32 = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if (isinstance(out, torch.Tensor) and source is not None and source.dtype == torch.bfloat16
                    and out.dtype == torch.float32 and out.numel() == source.numel()):
                to_fp32.append(getattr(func, "__name__", str(func)))
            return out

    grid = mask.view(2, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), Spy():
        latent = model.backend.encode(model.encoder, imgs, grid)
    assert latent.dtype == torch.bfloat16
    assert not to_fp32, f"bf16 activations cast to fp32 by {to_fp32}"


@pytest.mark.slow
def test_atto_bf16_equals_reference_in_bf16():
    model, imgs, mask = make_case("atto", (224, 224), 3, 0.6, seed=13)
    assert_same_as_reference(model, imgs, mask, "native", dtype=torch.bfloat16)


def test_bf16_autocast_close_to_fp32(kernel_path):
    assert "cpu" in get_backend("native").autocast_devices
    model, imgs, mask = make_case("debug", (96, 96), 2, 0.6, seed=6)
    model.set_backend(get_backend("native"))
    ref_loss, _, ref_grads = run_step(model, imgs, mask)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, pred, _ = model(imgs, mask=mask)
        latent = model.forward_encoder(imgs, mask)
    assert latent.dtype == torch.bfloat16
    loss.backward()
    torch.testing.assert_close(loss.float(), ref_loss, rtol=3e-2, atol=0)
    grad = model.encoder.stages[1].blocks[0].conv_dw.weight.grad
    ref = ref_grads["encoder.stages.1.blocks.0.conv_dw.weight"]
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, ref, rtol=0.1, atol=0.05 * float(ref.abs().max()))


@pytest.mark.parametrize("variant", ["debug", "atto"])
def test_executed_encoder_flops_within_bound_of_useful(variant):
    """FlopCounterMode over the encoder forward (+ uncounted MACs) <= 1.15x useful sparse MACs."""
    model, imgs, mask = make_case(variant, (224, 224), 2, 0.6, seed=7)
    backend = get_backend("native")
    grid_mask = mask.view(2, 7, 7)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        backend.encode(model.encoder, imgs, grid_mask)
    executed = counter.get_total_flops() / 2 + backend.uncounted_macs(model.encoder, imgs, grid_mask)
    useful = fcmae_gmacs(variant, mask=mask).encoder_useful * 1e9 * 2
    assert 0.95 * useful <= executed <= 1.15 * useful, (executed, useful)


def test_bad_mask_shape_raises():
    model, imgs, _ = make_case("debug", (64, 64), 1, 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        get_backend("native").encode(model.encoder, imgs, torch.zeros(1, 3, 3))


@pytest.mark.skipif(not minkowski_available()[0], reason=f"MinkowskiEngine: {minkowski_available()[1]}")
def test_equals_minkowski():
    model, imgs, mask = make_case("debug", (96, 64), 2, 0.6, seed=8)
    assert_same_as_reference(model, imgs, mask, "native", reference="minkowski")


@pytest.mark.slow
@pytest.mark.parametrize("mask_ratio", [0.25, 0.6, 0.9])
def test_atto_224_equals_reference(mask_ratio):
    model, imgs, mask = make_case("atto", (224, 224), 3, mask_ratio)
    assert_same_as_reference(model, imgs, mask, "native")


@pytest.mark.slow
def test_atto_non_square_equals_reference(kernel_path):
    model, imgs, mask = make_case("atto", (160, 96), 3, 0.6, seed=10)
    assert_same_as_reference(model, imgs, mask, "native")


@pytest.mark.slow
def test_atto_batch_independence_and_drop_path():
    model, imgs, mask = make_case("atto", (224, 224), 3, 0.6, seed=9, drop_path_rate=0.1)
    model.train()
    assert_same_as_reference(model, imgs, mask, "native")
    assert_batch_independent(model, imgs, mask, "native")


def test_downsample_window_order_and_stem_windows():
    """The row layout's two reshapes: window_rows puts each 2x2 window's sites on 4 consecutive
    rows in the conv weight's (ky, kx) order; stem_windows gives each stage-0 site's 4x4 pixels
    in the stem weight's (c, ky, kx) order."""
    from sparse_mae.backends.native.layout import SparseLayout

    layout = SparseLayout(torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 1.0], [0.0, 1.0]]]))
    st = layout.stage(1)  # 4 x 4 sites per patch
    p, s, c = layout.num_patches, st.side, 3
    tiles = torch.randn(p, s, s, c)
    windows = torch.empty(p * s * s, c).index_copy_(0, st.window_rows(), tiles.reshape(-1, c))
    expected = tiles.reshape(p, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4 * c)
    assert torch.equal(windows.view(-1, 4 * c), expected)
    imgs = torch.randn(2, 3, 64, 64)
    conv = torch.nn.Conv2d(3, 5, 4, 4)
    rows = torch.nn.functional.linear(layout.stem_windows(imgs), conv.weight.reshape(5, -1), conv.bias)
    dense = conv(imgs).permute(0, 2, 3, 1).reshape(2, 2, 8, 2, 8, 5).permute(0, 1, 3, 2, 4, 5)
    expected = dense[layout.patch_sample, layout.patch_y, layout.patch_x].reshape(-1, 5)
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=1e-5)


def test_uncounted_macs_are_the_depthwise_convs_run_in_c_or_triton(monkeypatch):
    import sparse_mae_kernels

    model, imgs, mask = make_case("debug", (96, 64), 2, 0.5)
    grid = mask.view(2, 3, 2)
    backend = get_backend("native")
    visible = int((mask == 0).sum())
    enc = model.encoder
    expected = sum(d * visible * sites * 49 * c for d, c, sites in zip(enc.depths, enc.dims, (64, 16, 4, 1)))
    assert backend.uncounted_macs(enc, imgs, grid) == expected  # the C kernels, on by default
    monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", "0")
    assert backend.uncounted_macs(enc, imgs, grid) == 0  # torch ops only: the counter sees them all
    monkeypatch.setattr(sparse_mae_kernels, "use_triton", lambda device: True)
    assert backend.uncounted_macs(enc, imgs, grid) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blocks, channels, grid", [(1, 48, (7, 7)), (2, 21, (3, 5))])  # odd sizes too
def test_decoder_blocks_on_the_row_kernels_equal_the_dense_blocks(dtype, blocks, channels, grid):
    """The decoder's blocks as rows with every site present (C kernels) give the dense
    blocks' output and every gradient (input and all block parameters)."""
    from sparse_mae.backends.base import EncoderBackend
    from sparse_mae.models.convnextv2 import Block
    from tests.kernel_helpers import assert_close

    torch.manual_seed(3)
    decoder = torch.nn.Sequential(*[Block(channels) for _ in range(blocks)])
    for p in decoder.parameters():  # GRN's zero init would hide its path
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, channels, *grid)
    outs = []
    for backend in (EncoderBackend(), get_backend("native")):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = backend.decode_blocks(decoder, xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(y.dtype)
        grads = torch.autograd.grad(y, [xx, *decoder.parameters()], g)
        outs.append((y, grads))
    (ref, ref_grads), (out, out_grads) = outs
    assert_close(out.detach(), ref.detach(), dtype, "decoder output")
    names = ["input", *(n for n, _ in decoder.named_parameters())]
    for name, a, b in zip(names, out_grads, ref_grads):
        assert_close(a, b, dtype, f"grad {name}")  # fp32 tensors, computed at `dtype`


def test_decoder_depthwise_macs_in_c_are_counted(monkeypatch):
    model, imgs, mask = make_case("debug", (96, 64), 2, 0.5)
    model.set_backend(get_backend("native"))
    backend = model.backend
    dim = model.mask_token.shape[1]
    decoder_dw = len(model.decoder) * 2 * 3 * 2 * 49 * dim
    encoder_dw = backend.uncounted_macs(model.encoder, imgs, mask.view(2, 3, 2))
    assert model.uncounted_macs(imgs, mask) == encoder_dw + decoder_dw
    monkeypatch.setenv("SPARSE_MAE_CPU_KERNELS", "0")
    assert model.uncounted_macs(imgs, mask) == 0
