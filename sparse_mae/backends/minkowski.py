"""`backend="minkowski"`: the encoder as true sparse convolutions with MinkowskiEngine 0.5.4.

The faithful baseline, not the fast path (ME's CPU kernels are slow, docs/design.md
section 4). Differences from the official FCMAE code, on purpose (docs/design.md section 3):
coordinates come from the mask, GRN's norm is per sample, the output is densified with the
grid shape.

Layout (ConvNeXt, `encode`): the stem runs dense; its output at the visible sites becomes a
SparseTensor with int32 coordinates (batch, y, x) on the 1/4 grid and tensor stride 1.
Each 2x2/2 downsample doubles the tensor stride (coordinates stay in 1/4-grid units), so
stage i has tensor stride 2**i and the 7x7 depthwise conv there reaches +-3 sites of its grid.

Layout (ResNet, `encode_stages`, SparK's encoder): the visible pixels are the SparseTensor
(coordinates in pixel units, tensor stride 1); conv1, the max-pool and each layer's strided
first block double the tensor stride, which is then the pixels per site of the layer's grid.
ME's conventions that make its numbers the dense_masked ones: docs/minkowski.md, "ResNets".

The backend owns no parameters: ME kernels are rebuilt from the encoder's canonical
dense weights on every forward with differentiable reshapes, so gradients land on them.

Devices: everything follows the images. On CUDA tensors the coordinates, and so ME's
coordinate manager and kernel maps, live on the GPU; that needs ME compiled with CUDA
(tools/install_minkowski.sh does so where torch is a CUDA build, docs/minkowski.md). A
CPU-only ME stops with an error naming the rebuild command; it never runs on the CPU
behind the caller's back.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparse_mae.backends.base import EncoderBackend, upsample_mask
from sparse_mae.backends.minkowski_compat import (
    CUDA_REBUILD_COMMAND,
    import_minkowski,
    minkowski_built_with_cuda,
    minkowski_import_error,
)
from sparse_mae.models.geometry import KERNEL_SIZE, PATCH, STAGE_UPSAMPLE
from sparse_mae.flops import conv_macs_per_patch
from sparse_mae.models.resnet import ResNet, is_pointwise
from sparse_mae.models.sparse_norm import batch_norm_rows

if TYPE_CHECKING:
    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2

# Below this, sum of squares is treated as 0 so sqrt's gradient stays finite (a channel
# that is exactly zero over a sample); far below GRN's eps, so values are unchanged.
_GRN_TINY = 1e-30


def depthwise_to_me(weight: torch.Tensor) -> torch.Tensor:
    """torch depthwise (C, 1, 7, 7) -> ME channelwise kernel (49, C) (inverse of docs/design.md 4)."""
    c = weight.shape[0]
    return weight.transpose(3, 2).reshape(c, KERNEL_SIZE * KERNEL_SIZE).permute(1, 0)


def depthwise_from_me(kernel: torch.Tensor) -> torch.Tensor:
    """ME channelwise kernel (49, C) -> torch depthwise (C, 1, 7, 7) (docs/design.md section 4)."""
    c = kernel.shape[1]
    return kernel.permute(1, 0).reshape(c, 1, KERNEL_SIZE, KERNEL_SIZE).transpose(3, 2)


def conv_to_me(weight: torch.Tensor) -> torch.Tensor:
    """torch (Cout, Cin, kh, kw) -> ME convolution kernel (kh*kw, Cin, Cout). ME numbers the
    kernel offsets with the first coordinate (y) fastest, so offset (ky, kx) is row kx*kh + ky;
    a differentiable reshape, so the gradient of the ME kernel lands on the torch weight."""
    cout, cin, kh, kw = weight.shape
    return weight.permute(3, 2, 1, 0).reshape(kw * kh, cin, cout).contiguous()


def strided_to_me(weight: torch.Tensor) -> torch.Tensor:
    """torch (Cout, Cin, 2, 2) -> ME convolution kernel (4, Cin, Cout) (inverse of docs/design.md 4)."""
    return conv_to_me(weight)


def strided_from_me(kernel: torch.Tensor) -> torch.Tensor:
    """ME convolution kernel (4, Cin, Cout) -> torch (Cout, Cin, 2, 2) (docs/design.md section 4)."""
    return kernel.permute(2, 1, 0).reshape(kernel.shape[2], kernel.shape[1], 2, 2).transpose(3, 2)


class MinkowskiNotBuiltForCudaError(RuntimeError):
    """backend='minkowski' on CUDA tensors with a MinkowskiEngine compiled without CUDA."""


class MinkowskiBackend(EncoderBackend):
    name = "minkowski"
    autocast_devices = ()  # ME has no fp16/bf16 kernels

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        error = minkowski_import_error()
        return (True, "") if error is None else (False, error)

    # -- forward -----------------------------------------------------------------------

    def encode(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ME = import_minkowski()
        n, _, h, w = imgs.shape
        self._check(ME, imgs, mask)
        x = self._sparse_stem(ME, encoder, imgs, mask)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                x = self._downsample(ME, stage.downsample, x)
            neighbours = self._depthwise_neighbours(ME, x)  # the same sites for every block of the stage
            batch_index = x.C[:, 0].long()
            for block in stage.blocks:
                x = self._block(ME, block, x, neighbours, batch_index, n)
        return self._densify(x, n, h // PATCH, w // PATCH)

    @staticmethod
    def _check(ME, imgs: torch.Tensor, mask: torch.Tensor) -> None:
        n, _, h, w = imgs.shape
        if tuple(mask.shape) != (n, h // PATCH, w // PATCH):
            raise ValueError(f"mask must be (N, H/32, W/32) = {(n, h // PATCH, w // PATCH)}, got {tuple(mask.shape)}")
        kept = (mask == 0).flatten(1).sum(dim=1)
        if bool((kept == 0).any()):
            # ME would crash (segfault) on an empty coordinate map; the interface promises >= 1.
            bad = torch.nonzero(kept == 0).flatten().tolist()
            raise ValueError(f"mask keeps 0 patches in sample(s) {bad}; every sample must keep at least 1 patch")
        device = imgs.device
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"MinkowskiEngine runs on CPU or CUDA tensors, got {device}; "
                             f"move the model and images to one of them or use backend='native'")
        if device.type == "cuda" and not minkowski_built_with_cuda(ME):
            raise MinkowskiNotBuiltForCudaError(
                f"the images are on {device}, but this MinkowskiEngine was built without CUDA "
                f"(CPU_ONLY), so backend='minkowski' cannot run on the GPU. Rebuild it with CUDA: "
                f"`{CUDA_REBUILD_COMMAND}` (installs the CUDA build of torch, then builds "
                f"MinkowskiEngine with CUDA; docs/minkowski.md). Or run on the CPU, or use backend='native'."
            )
        if imgs.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled(imgs.device.type):
            raise ValueError(
                f"MinkowskiEngine runs float32/float64 only (got {imgs.dtype}, autocast "
                f"{'on' if torch.is_autocast_enabled(imgs.device.type) else 'off'}); run without autocast/half "
                f"(amp=false) or use backend='native'"
            )

    @staticmethod
    def _stage0_coordinates(mask: torch.Tensor) -> torch.Tensor:
        """(M, 3) int32 (batch, y, x) of the visible 1/4-grid sites, row-major; from the mask only."""
        visible = upsample_mask(mask.to(torch.bool).logical_not(), STAGE_UPSAMPLE[0])
        return torch.nonzero(visible).to(torch.int32).contiguous()

    def _sparse_stem(self, ME, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor):
        stem = encoder.stem(imgs)  # dense: (N, C0, H/4, W/4)
        # On the images' device: ME builds its coordinate manager where the coordinates are.
        coords = self._stage0_coordinates(mask.to(stem.device))
        rows = coords.long()
        feats = stem[rows[:, 0], :, rows[:, 1], rows[:, 2]]  # (M, C0), the coordinates' order
        return ME.SparseTensor(feats, coordinates=coords, tensor_stride=1)

    @staticmethod
    def _depthwise_neighbours(ME, x) -> torch.Tensor:
        """(49, M) long: for kernel offset k and site o, the row of the input site that ME's
        submanifold 7x7 kernel map pairs with o, or M (a zero pad row) where there is none."""
        generator = ME.KernelGenerator(kernel_size=KERNEL_SIZE, stride=1, dilation=1, dimension=2)
        region_type, region_offset, _ = generator.get_kernel(x.tensor_stride, False)
        key = x.coordinate_map_key
        kernel_map = x.coordinate_manager.kernel_map(
            key, key, stride=1, kernel_size=KERNEL_SIZE, dilation=1, region_type=region_type, region_offset=region_offset
        )
        sites = x.F.shape[0]
        # Built where the kernel map is (the coordinate manager's device, that of x.F).
        neighbours = torch.full((KERNEL_SIZE * KERNEL_SIZE, sites), sites, dtype=torch.long, device=x.F.device)
        for k, in_out in kernel_map.items():
            neighbours[k, in_out[1].long().to(x.F.device)] = in_out[0].long().to(x.F.device)
        return neighbours

    @staticmethod
    def _densify(x, batch: int, grid_h: int, grid_w: int) -> torch.Tensor:
        """Sparse tensor -> (N, C, grid_h, grid_w), zero at removed sites. The grid
        shape and origin are explicit, so a grid whose last row/column is masked everywhere
        keeps its size (ME's own dense() cannot take an origin for CUDA tensors: it wants a
        CPU IntTensor and subtracts it from the GPU coordinates)."""
        stride = x.tensor_stride[0]  # coordinate units per site of x's grid
        coords = x.C.long()
        dense = x.F.new_zeros(batch, x.F.shape[1], grid_h, grid_w)
        dense[coords[:, 0], :, coords[:, 1] // stride, coords[:, 2] // stride] = x.F
        return dense

    @staticmethod
    def _depthwise(feats: torch.Tensor, conv: torch.nn.Conv2d, neighbours: torch.Tensor) -> torch.Tensor:
        """MinkowskiChannelwiseConvolution's sum over ME's kernel map (out[o] += F[i] * W[k]
        for every pair (i, o) at offset k), with the kernel taken from the dense weight
        (upstream ME has no functional form of it). Written as one gather over the whole
        map rather than ME's 49 scatter-adds: the same sum in a few large ops, which stays
        fast when the CPU is shared."""
        kernel = depthwise_to_me(conv.weight)  # (49, C)
        padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])
        return (padded[neighbours] * kernel.unsqueeze(1)).sum(dim=0) + conv.bias

    @staticmethod
    def _grn(grn, y: torch.Tensor, batch_index: torch.Tensor, batch: int) -> torch.Tensor:
        """GRN with the L2 norm over each sample's visible sites (not the whole batch)."""
        sum_sq = y.new_zeros(batch, y.shape[1]).index_add_(0, batch_index, y * y)
        gx = sum_sq.clamp_min(_GRN_TINY).sqrt()  # (N, C)
        nx = gx / (gx.mean(dim=1, keepdim=True) + grn.eps)
        return y + grn.bias + grn.weight * (y * nx[batch_index])

    def _block(self, ME, block: Block, x, neighbours: torch.Tensor, batch_index: torch.Tensor, batch: int):
        feats = x.F
        y = self._depthwise(feats, block.conv_dw, neighbours)
        mlp = block.mlp
        y = mlp.act(mlp.fc1(block.norm(y)))
        y = mlp.fc2(self._grn(mlp.grn, y, batch_index, batch))
        # Drawn once per block through the shared helper: same RNG order as dense_masked.
        scale = block.drop_path_scale(batch, feats.device, feats.dtype)
        if scale is not None:
            y = y * scale[batch_index].unsqueeze(1)
        return ME.SparseTensor(feats + y, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    @staticmethod
    def _downsample(ME, downsample: torch.nn.Sequential, x):
        """LayerNorm on the features, then ME's 2x2/2 convolution onto the strided sites."""
        norm, conv = downsample
        feats = F.layer_norm(x.F, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
        generator = ME.KernelGenerator(kernel_size=2, stride=2, dilation=1, dimension=2)
        manager = x.coordinate_manager
        out_key = manager.stride(x.coordinate_map_key, generator.kernel_stride)
        from MinkowskiEngineBackend._C import ConvolutionMode  # not re-exported by ME; loaded with it

        out = ME.MinkowskiConvolutionFunction.apply(
            feats, strided_to_me(conv.weight), generator, ConvolutionMode.DEFAULT,
            x.coordinate_map_key, out_key, manager,
        )
        return ME.SparseTensor(out + conv.bias, coordinate_map_key=out_key, coordinate_manager=manager)

    # -- ResNet (SparK) --------------------------------------------------------------------

    def encode_stages(self, encoder: ResNet, imgs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """SparK's sparse encoder in ME: a SparseTensor over the visible pixels, every layer on
        ME's kernel maps (docs/minkowski.md, "ResNets"), each stage densified."""
        ME = import_minkowski()
        self._check(ME, imgs, mask)
        n, _, h, w = imgs.shape
        x = self._visible_pixels(ME, imgs, mask)
        x = self._conv(ME, encoder.conv1, x)
        x = self._replace_features(ME, x, encoder.act1(batch_norm_rows(encoder.bn1, x.F)))
        x = self._max_pool(ME, encoder.maxpool, x)
        features = []
        for layer in encoder.layers():
            for block in layer:
                x = self._resnet_block(ME, block, x)
            grid = x.tensor_stride[0]  # pixels per site of this stage's grid
            features.append(self._densify(x, n, h // grid, w // grid))
        return features

    @staticmethod
    def _visible_pixels(ME, imgs: torch.Tensor, mask: torch.Tensor):
        """The visible pixels as a SparseTensor: int32 (batch, y, x) in pixel units, tensor
        stride 1. Every later layer's coordinates stay in pixel units, its tensor stride the
        pixels per site of its grid (2 after conv1, 4 after the max-pool, ... 32)."""
        visible = upsample_mask(mask.to(imgs.device, torch.bool).logical_not(), PATCH)
        coords = torch.nonzero(visible).to(torch.int32).contiguous()
        rows = coords.long()
        return ME.SparseTensor(imgs[rows[:, 0], :, rows[:, 1], rows[:, 2]], coordinates=coords, tensor_stride=1)

    @staticmethod
    def _replace_features(ME, x, feats: torch.Tensor):
        """feats (one row per site of x, x's order) on x's coordinates."""
        return ME.SparseTensor(feats, coordinate_map_key=x.coordinate_map_key, coordinate_manager=x.coordinate_manager)

    def _conv(self, ME, conv: torch.nn.Conv2d, x):
        """A bias-free dense conv (k x k, stride t, padding k // 2) on x's sites. 1x1 stride 1: a
        matmul on the features (what MinkowskiLinear does). Otherwise MinkowskiConvolution's
        function with the dense weight: stride 1 is submanifold (output sites = input sites);
        stride t maps onto ME's strided map (coordinates floored to multiples of t times the
        tensor stride: the visible patches' sites of the coarser grid). An odd ME kernel is
        centred on the output coordinate, offsets -k//2..k//2 times the input's tensor stride,
        so output site y reads input sites t*y - k//2 + ky, as torch's conv with padding k//2;
        sites absent from the map (hidden, or outside the image) read zero, as the padding."""
        (k, _), (t, _) = conv.kernel_size, conv.stride
        if k == 1 and t == 1:
            return self._replace_features(ME, x, F.linear(x.F, conv.weight.flatten(1)))
        from MinkowskiEngineBackend._C import ConvolutionMode  # not re-exported by ME; loaded with it

        generator = ME.KernelGenerator(kernel_size=k, stride=t, dilation=1, dimension=2)
        manager, in_key = x.coordinate_manager, x.coordinate_map_key
        out_key = in_key if t == 1 else manager.stride(in_key, generator.kernel_stride)
        out = ME.MinkowskiConvolutionFunction.apply(
            x.F, conv_to_me(conv.weight), generator, ConvolutionMode.DEFAULT, in_key, out_key, manager,
        )
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=manager)

    @staticmethod
    def _max_pool(ME, pool: torch.nn.MaxPool2d, x):
        """MinkowskiMaxPooling's function: the maximum over the sites present in each window
        (the visible ones; hidden sites and the padding never count), onto the strided map."""
        from MinkowskiEngineBackend._C import PoolingMode  # not re-exported by ME; loaded with it

        generator = ME.KernelGenerator(kernel_size=pool.kernel_size, stride=pool.stride, dilation=1, dimension=2)
        manager, in_key = x.coordinate_manager, x.coordinate_map_key
        out_key = manager.stride(in_key, generator.kernel_stride)
        out = ME.MinkowskiLocalPoolingFunction.apply(
            x.F, PoolingMode.LOCAL_MAX_POOLING, generator, in_key, out_key, manager,
        )
        return ME.SparseTensor(out, coordinate_map_key=out_key, coordinate_manager=manager)

    def _resnet_block(self, ME, block, x):
        """BasicBlock or Bottleneck; BatchNorm over the rows (the visible sites of the batch).
        The shortcut and the branch end on the same coordinate map (the same strided key), so
        their rows are the same sites in the same order."""
        shortcut = x.F
        if block.downsample is not None:
            conv, bn = block.downsample
            shortcut = batch_norm_rows(bn, self._conv(ME, conv, x).F)
        *inner, (conv, bn, act) = block.branch()
        for inner_conv, inner_bn, inner_act in inner:
            x = self._conv(ME, inner_conv, x)
            x = self._replace_features(ME, x, inner_act(batch_norm_rows(inner_bn, x.F)))
        x = self._conv(ME, conv, x)
        return self._replace_features(ME, x, act(batch_norm_rows(bn, x.F) + shortcut))

    # -- cost --------------------------------------------------------------------------

    def uncounted_macs(self, encoder: ConvNeXtV2, imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """MACs of the depthwise and downsample convs (ME kernels and indexed adds, which
        FlopCounterMode does not see), counted from ME's own kernel maps for this mask. A
        ResNet's: its ME convs (all but the 1x1 stride-1 matmuls) as the dense-equivalent work
        of the visible sites, every tap counted: ME skips absent taps, so it runs at most this."""
        if isinstance(encoder, ResNet):
            visible = int((mask == 0).sum())
            return visible * sum(conv_macs_per_patch(conv, stride)[0] for conv, stride in encoder.convs()
                                 if not is_pointwise(conv))
        ME = import_minkowski()
        self._check(ME, imgs, mask)
        coords = self._stage0_coordinates(mask.cpu())
        x = ME.SparseTensor(torch.zeros(coords.shape[0], 1), coordinates=coords, tensor_stride=1)
        macs = 0
        for i, depth in enumerate(encoder.depths):
            if i > 0:
                manager = x.coordinate_manager
                in_key = x.coordinate_map_key
                out_key = manager.stride(in_key, 2)
                pairs = manager.kernel_map(in_key, out_key, stride=2, kernel_size=2, dilation=1)
                macs += sum(len(p[0]) for p in pairs.values()) * encoder.dims[i - 1] * encoder.dims[i]
                x = ME.SparseTensor(torch.zeros(manager.size(out_key), 1), coordinate_map_key=out_key,
                                    coordinate_manager=manager)
            dw_pairs = int((self._depthwise_neighbours(ME, x) < x.F.shape[0]).sum())
            macs += depth * dw_pairs * encoder.dims[i]
        return macs
