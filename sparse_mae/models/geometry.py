"""The facts of the ConvNeXt V2 architecture, each written once, here with the model.

The models state them (as timm's convnext.py states its own reductions); the backends,
the FLOP count and the config import them from here. The kernel package
(`sparse_mae_kernels`) sits below sparse_mae and imports nothing of it: its kernels are
compiled for a 7x7 depthwise conv (its own `constants.KERNEL_SIZE`, the size the C and
Triton code is specialised to, checked against this one by the native backend and a
test) and take every epsilon as an argument, which the backends read off the modules.
Plain Python, no torch: config.py reads it too.
"""
from __future__ import annotations

NUM_STAGES = 4
STEM_STRIDE = 4  # the stem's 4x4 conv, stride 4: stage 0 is at 1/4 resolution
DOWNSAMPLE_STRIDE = 2  # each later stage's 2x2 conv, stride 2
# Resolution reduction of each stage's grid: (4, 8, 16, 32).
STAGE_STRIDES = tuple(STEM_STRIDE * DOWNSAMPLE_STRIDE**i for i in range(NUM_STAGES))
PATCH = STAGE_STRIDES[-1]  # the encoder's total stride, so one cell of the mask grid: the FCMAE patch size
# Up-sampling factor from the 1/32 mask grid to each stage's grid: (8, 4, 2, 1).
STAGE_UPSAMPLE = tuple(PATCH // s for s in STAGE_STRIDES)
# Sites of one patch at each stage: (64, 16, 4, 1).
STAGE_SITES_PER_PATCH = tuple(f * f for f in STAGE_UPSAMPLE)

KERNEL_SIZE = 7  # every block's depthwise conv is KERNEL_SIZE x KERNEL_SIZE, padding KERNEL_SIZE // 2
LN_EPS = 1e-6  # the epsilon of every LayerNorm (stem, downsamples, blocks, head)
GRN_EPS = 1e-6  # GRN: nx = gx / (mean_c gx + GRN_EPS)


def visible_count(num_patches: int, mask_ratio: float) -> int:
    """Patches each sample keeps when a fraction `mask_ratio` of its `num_patches` is removed:
    max(1, int(L * (1 - mask_ratio))), at least one. FCMAE draws exactly this many, the FLOP
    count and the config's checks use the same count."""
    return max(1, int(num_patches * (1 - mask_ratio)))
