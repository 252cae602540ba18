"""Triton, where installed: the import every op file's Triton section uses, and whether the
kernels can run on a device.

`triton` and `tl` are None without Triton; the op files then define no Triton kernels and
their Triton launchers raise a clear error. Importing Triton fixes whether its kernels run
compiled (CUDA) or in its CPU interpreter: TRITON_INTERPRET must be set before the first
import of `sparse_mae_kernels.ops` (tests/conftest.py does that on machines without a GPU).
"""
from __future__ import annotations

import os
import sys

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # optional: the CPU path needs no Triton
    triton = tl = None

# Tile sizes shared by the op files' launchers: BLOCK_M rows x BLOCK_C channels per program.
BLOCK_M = 32
TARGET_PROGRAMS = 1024  # enough programs to fill an H100 (132 SMs) several times over


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_active() -> bool:
    """TRITON_INTERPRET is on now and Triton was imported under it."""
    if triton is None or not interpreter_requested():
        return False
    # triton.language's own @jit helpers were built in the mode of the first import
    helper = getattr(getattr(sys.modules.get("triton.language"), "standard", None), "cdiv", None)
    return helper is None or type(helper).__name__ == "InterpretedFunction"


def triton_available(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on `device`.

    CUDA: Triton installed and a GPU of compute capability >= 7.0. CPU: Triton installed
    and its interpreter switched on (TRITON_INTERPRET=1 before Triton's first import).
    """
    if triton is None:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (7, 0)
    return device.type == "cpu" and interpreter_active()


def require_triton(device: torch.device) -> None:
    if triton_available(device):
        return
    if triton is None:
        why = "Triton is not installed (pip install triton)"
    elif device.type == "cpu":
        why = "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before Triton is first imported"
    else:
        why = f"no usable CUDA GPU for {device}"
    raise RuntimeError(f"Triton kernels cannot run here: {why}. Use the *_reference functions or impl='c' on CPU.")


def block_c(c: int, limit: int) -> int:
    """A power-of-two channel block: at least 16, at most `limit`, no wider than C needs."""
    return max(16, min(limit, 1 << (max(c, 1) - 1).bit_length()))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
