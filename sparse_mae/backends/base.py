"""The one small interface every encoder backend implements.

A backend owns no parameters and no architecture facts (those are the model's, in
sparse_mae/models/geometry.py; FCMAE is handed a backend object). It runs the forward of
a dense `ConvNeXtV2` encoder (the canonical parameter layout) over the visible patches
only, so a checkpoint from any backend loads into any other by construction.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sparse_mae.models.convnextv2 import Block, ConvNeXtV2

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
