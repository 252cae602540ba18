"""The ops of the native engine, one per file: kernel(s), launcher, autograd function and
plain-torch reference together (the layout of Liger-Kernel's `ops/`). Named by the layout
they take: `rows_*` on packed rows (M, C) with a neighbour map or per-sample row
segments (C kernels on CPU, Triton on CUDA); `tiles_*` on patch tiles (P, s, s, C) (torch
ops; the engine's fallback on any device)."""
