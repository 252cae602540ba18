"""The one shape the kernels are compiled for: a 7x7 depthwise conv (the C sources get TAPS
as -DTAPS, the Triton kernels as a constexpr). The model states its own kernel size
(sparse_mae/models/geometry.py); the native backend refuses to run if the two differ. The
kernels take every epsilon (LayerNorm, GRN) as an argument: those are the model's facts,
read by the backend off the modules it runs. This package imports nothing of sparse_mae."""

KERNEL_SIZE = 7  # the depthwise conv's kernel (7x7) the kernels are specialised to
HALO = KERNEL_SIZE // 2  # neighbours on each side of a site
TAPS = KERNEL_SIZE * KERNEL_SIZE  # 49 taps, k = (dy + 3) * 7 + (dx + 3): a dense (C, 1, 7, 7) weight's order
