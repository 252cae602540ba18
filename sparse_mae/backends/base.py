"""The one small interface every encoder backend implements.

A backend owns no parameters and no architecture facts (those are the model's, in
sparse_mae/models/geometry.py and models/resnet.py; FCMAE and SparK are handed a backend
object). It runs the forward of a dense encoder (the canonical parameter layout) over the
visible patches only, so a checkpoint from any backend loads into any other by
construction. Two entry points, one per kind of pretraining model:

- `encode(convnext, imgs, mask)`: FCMAE's ConvNeXt V2, the last stage's features only.
- `encode_stages(resnet, imgs, mask)`: SparK's ResNet, the features of every stage (its
  hierarchical decoder reads all four), each exactly zero at removed sites. BatchNorm
  normalises over the visible sites of the whole batch (SparK's sparse BN) through
  sparse_mae/models/sparse_norm.py, the one place that runs a BatchNorm on sparse
  features, so a SyncBatchNorm (its `convert_sync_batchnorm`, or torch's on GPUs)
  synchronises the visible-site statistics over DDP processes in every backend.

A backend that cannot run an encoder raises NotImplementedError naming the ones that can.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2
    from sparse_mae.models.resnet import ResNet

# The geometry every backend shares (PATCH, STAGE_UPSAMPLE, ...) is the model's:
# sparse_mae/models/geometry.py. The backends import the models, never the reverse.


class BackendUnavailableError(RuntimeError):
    """A backend whose dependencies are not installed; the message says how to install them."""


class EncoderBackend:
    name: str = "?"
    #: device types ("cpu", "cuda") on which the backend runs under torch.autocast
    autocast_devices: tuple[str, ...] = ()

    @classmethod
    def availability(cls) -> tuple[bool, str]:
        """(available, reason-if-not). Must not raise."""
        return True, ""

    def encode(self, encoder: "ConvNeXtV2", imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the encoder over the visible patches.

        imgs: (N, C_in, H, W), H and W multiples of 32.
        mask: (N, H/32, W/32), 1 = removed, 0 = visible; every sample keeps >= 1 patch.
        returns: (N, C3, H/32, W/32) features, exactly zero at removed sites.
        """
        raise NotImplementedError

    def encode_stages(self, encoder: "ResNet", imgs: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Run a ResNet encoder over the visible patches, keeping every stage.

        imgs: (N, C_in, H, W), H and W multiples of 32.
        mask: (N, H/32, W/32), 1 = removed, 0 = visible; every sample keeps >= 1 patch.
        returns: layer1..4's outputs, [(N, encoder.stage_dims[i], H/s_i, W/s_i)] for the stage
        grids s_i = geometry.STAGE_STRIDES = (4, 8, 16, 32), each exactly zero at removed sites.
        In training mode the encoder's BatchNorms use (and update their running statistics
        with) the visible sites only; in eval mode their running statistics.
        """
        raise NotImplementedError(f"backend {self.name!r} does not run ResNet encoders; "
                                  f"use backend=dense_masked or backend=native")

    def decode_blocks(self, blocks: "Sequence[Block]", x: torch.Tensor) -> torch.Tensor:
        """Run the FCMAE decoder's ConvNeXt blocks over every site: (N, C, h, w) -> same.
        Dense work, the same numbers in every backend; by default the blocks' own forward,
        and a backend with faster kernels for a block may run them there."""
        for block in blocks:
            x = block(x)
        return x

    def uncounted_macs(self, encoder: "ConvNeXtV2", imgs: torch.Tensor, mask: torch.Tensor) -> int:
        """MACs of one forward that torch's FlopCounterMode cannot see (custom C++/Triton
        kernels). The benchmark adds them to what the counter measured; 0 when every op
        is a torch op."""
        return 0

    def uncounted_decode_macs(self, blocks: "Sequence[Block]", x: torch.Tensor) -> int:
        """The same for `decode_blocks(blocks, x)`."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w) -> (N, h*factor, w*factor), nearest."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
