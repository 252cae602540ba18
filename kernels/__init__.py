"""Hand-written kernels (import name `sparse_mae_kernels`), each beside a plain-torch reference.

- `sparse_ops`: CPU/any-device autograd ops of the native sparse engine (halo-tile
  depthwise 7x7, per-sample segment GRN), each with a `*_reference` in plain torch.
- `triton_ops` (CUDA only, optional): Triton kernels for the same ops on packed rows.

`use_triton(device)` is the one switch: Triton kernels are used on CUDA when they import
and the environment variable SPARSE_MAE_TRITON is not "0".
"""
from __future__ import annotations

import os

import torch

TRITON_ENV = "SPARSE_MAE_TRITON"


def use_triton(device: torch.device | str) -> bool:
    """True when the native engine should run its Triton kernels on `device`."""
    if torch.device(device).type != "cuda":
        return False
    if os.environ.get(TRITON_ENV, "1").strip() == "0":
        return False
    try:
        from sparse_mae_kernels import triton_ops
    except ImportError:  # triton missing, or the kernels not built for this install
        return False
    available = getattr(triton_ops, "triton_available", None)
    return bool(available(device)) if available is not None else True
