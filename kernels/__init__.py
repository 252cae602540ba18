"""Hand-written kernels (import name `sparse_mae_kernels`), each beside a plain-torch reference.

- `sparse_ops`: torch autograd ops of the native sparse engine on patch tiles (halo-tile
  depthwise 7x7, per-sample segment GRN), each with a `*_reference` in plain torch; the
  engine's fallback on any device.
- `dwconv_rows`: the packed-row contract of the sparse depthwise 7x7 (neighbour map,
  checks, plain-torch reference), implemented by:
  - `cpu_ops`: C kernels (csrc/), compiled on first use with the system C compiler;
  - `triton_ops` (CUDA, optional): Triton kernels, plus the per-segment GRN.

Two switches, one per device kind, read at every call:
- `use_cpu_kernels(device)`: on CPU when the C kernels build and SPARSE_MAE_CPU_KERNELS
  is not "0";
- `use_triton(device)`: on CUDA when Triton imports and SPARSE_MAE_TRITON is not "0".
"""
from __future__ import annotations

import os
import warnings

import torch

TRITON_ENV = "SPARSE_MAE_TRITON"
CPU_KERNELS_ENV = "SPARSE_MAE_CPU_KERNELS"

_warned_cpu_fallback = False


def _switched_off(env: str) -> bool:
    return os.environ.get(env, "1").strip() == "0"


def use_triton(device: torch.device | str) -> bool:
    """True when the native engine should run its Triton kernels on `device`."""
    if torch.device(device).type != "cuda" or _switched_off(TRITON_ENV):
        return False
    try:
        from sparse_mae_kernels import triton_ops
    except ImportError:  # triton missing, or the kernels not built for this install
        return False
    available = getattr(triton_ops, "triton_available", None)
    return bool(available(device)) if available is not None else True


def use_cpu_kernels(device: torch.device | str) -> bool:
    """True when the native engine should run its C kernels on `device` (CPU only).

    Builds them on the first call; if that fails, warns once with the reason and returns
    False, so the engine runs its (slower) torch ops instead.
    """
    global _warned_cpu_fallback
    if torch.device(device).type != "cpu" or _switched_off(CPU_KERNELS_ENV):
        return False
    from sparse_mae_kernels import cpu_ops

    if cpu_ops.available():
        return True
    if not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn(
            f"sparse-mae: {cpu_ops.unavailable_reason()}. The native backend runs its slower torch ops "
            f"instead; set {CPU_KERNELS_ENV}=0 to choose that without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False
