"""Hand-written kernels of the native sparse engine, import name `sparse_mae_kernels`.

The folder is `kernels/sparse_mae_kernels/`: `kernels/` at the top of the repository holds
this one package, named as it imports (PyPI's unrelated `kernels` package owns the plain
name); `sparse_mae.backends.native` is the backend that runs it.

- `ops/`: one op per file, each holding its kernels (C and Triton), launchers, autograd
  function and plain-torch reference; named by the layout they take: `rows_*` on packed
  rows (M, C), `tiles_*` on patch tiles (P, s, s, C) (torch ops, the fallback):
  `rows_dwconv`, `rows_dwconv_layernorm`, `rows_layernorm`, `rows_grn` (with a bias +
  GELU prologue), `rows_residual`, `rows_gather_conv` (a dense-weight conv over a neighbour
  map: the submanifold and strided convs of a sparse ResNet), `tiles_dwconv`, `tiles_grn`.
- `csrc/`: the C sources (one per op, a shared header, the thread pool), built by
  `cpu_build` into one library on first use; `triton_runtime`: Triton where installed;
  `triton_aot`: compiles every Triton kernel for a GPU target without a GPU.
- `constants` (the 7x7 depthwise size the kernels are compiled for; every epsilon is an
  argument: the model's fact, passed by the backend), `common` (checks and dtype rules
  every op shares).

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
    from sparse_mae_kernels.triton_runtime import triton_available

    return triton_available(device)


def use_cpu_kernels(device: torch.device | str) -> bool:
    """True when the native engine should run its C kernels on `device` (CPU only).

    Builds them on the first call; if that fails, warns once with the reason and returns
    False, so the engine runs its (slower) torch ops instead.
    """
    global _warned_cpu_fallback
    if torch.device(device).type != "cpu" or _switched_off(CPU_KERNELS_ENV):
        return False
    from sparse_mae_kernels import cpu_build

    if cpu_build.available():
        return True
    if not _warned_cpu_fallback:
        _warned_cpu_fallback = True
        warnings.warn(
            f"sparse-mae: {cpu_build.unavailable_reason()}. The native backend runs its slower torch ops "
            f"instead; set {CPU_KERNELS_ENV}=0 to choose that without this warning.",
            RuntimeWarning,
            stacklevel=2,
        )
    return False


def row_impl(device: torch.device | str) -> str | None:
    """The kernels to run on `device`: 'triton' on CUDA, 'c' on the CPU, each when switched on
    and usable; None: the caller's torch ops."""
    if use_triton(device):
        return "triton"
    if use_cpu_kernels(device):
        return "c"
    return None
