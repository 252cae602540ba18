"""Constants of the ConvNeXt V2 block that the kernels and the models share, defined once."""

KERNEL_SIZE = 7  # the depthwise conv's kernel (7x7)
HALO = KERNEL_SIZE // 2  # neighbours on each side of a site
TAPS = KERNEL_SIZE * KERNEL_SIZE  # 49 taps, k = (dy + 3) * 7 + (dx + 3): a dense (C, 1, 7, 7) weight's order
GRN_EPS = 1e-6  # GRN: nx = gx / (mean_c gx + GRN_EPS)
LN_EPS = 1e-6  # LayerNorm epsilon of every norm in ConvNeXt V2
