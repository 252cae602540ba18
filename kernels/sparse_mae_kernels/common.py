"""Input checks and dtype rules shared by the ops in `ops/` (one op per file there).

Every op takes features as packed rows (M, C) (or patch tiles, for the `tiles_*` ops) in
float32, bfloat16 or float16, and parameters in any float dtype. Kernels compute in
float32 and store in the features' dtype. Under autocast, features are first cast to the
autocast dtype (as the dense op they replace would be); parameters are read as they are
(fp32 master weights) and their gradients come back in their own dtype.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for `device`'s type, or None."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an op computes and stores its features in: autocast's, else x's."""
    return autocast_dtype(x.device) or x.dtype


def check_rows(x, name: str = "x") -> tuple[int, int]:
    """x must be float packed rows (M, C) -> (M, C)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be packed rows (M, C), got {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")
    return x.shape


def check_vector(t, name: str, c: int, device: torch.device, optional: bool = False) -> None:
    """A per-channel parameter: float (C,) on x's device."""
    if t is None:
        if optional:
            return
        raise ValueError(f"{name} is required")
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (c,):
        raise ValueError(f"{name} must be (C,) = ({c},), got {tuple(getattr(t, 'shape', ()))} (reshape with .view(-1))")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}; move them to one device")


def check_offsets(seg_offsets, m: int, device: torch.device, check_values: bool | None) -> None:
    """seg_offsets (N+1,) int64 rising from 0 to M: segment n is rows offsets[n]:offsets[n+1].

    The values are checked when check_values is True, or None on CPU (on CUDA it costs a
    device sync, so only on request)."""
    if not isinstance(seg_offsets, torch.Tensor) or seg_offsets.dim() != 1 or seg_offsets.numel() < 2:
        raise ValueError(f"seg_offsets must be (N+1,) with N >= 1 segments, got {tuple(getattr(seg_offsets, 'shape', ()))}")
    if seg_offsets.dtype != torch.int64:
        raise ValueError(f"seg_offsets must be int64 (convert with .long()), got {seg_offsets.dtype}")
    if seg_offsets.device != device:
        raise ValueError(f"seg_offsets is on {seg_offsets.device} but x is on {device}; move them to one device")
    if check_values or (check_values is None and device.type == "cpu"):
        # once per version of the tensor: the engine passes one per stage to every block
        if getattr(seg_offsets, "_sparse_mae_checked", None) == (seg_offsets._version, m):
            return
        if int(seg_offsets[0]) != 0 or int(seg_offsets[-1]) != m or bool((seg_offsets.diff() < 0).any()):
            raise ValueError(f"seg_offsets must rise from 0 to M = {m} (segment n is rows offsets[n]:offsets[n+1])")
        seg_offsets._sparse_mae_checked = (seg_offsets._version, m)


def ready_impl(op: str, impl: str, x: torch.Tensor) -> None:
    """Check that `impl` runs here (C: CPU tensors and a built library; Triton: importable for
    x's device): a clear error now rather than inside autograd."""
    if impl == "c":
        from sparse_mae_kernels import cpu_build

        cpu_build.require_cpu(op, x=x)
        cpu_build.library()
    else:
        from sparse_mae_kernels.triton_runtime import require_triton

        require_triton(x.device)


def pick_impl(impl: str | None, device: torch.device) -> str:
    """'c' on CPU, 'triton' on CUDA, unless asked for explicitly (tests run 'triton' on CPU
    in Triton's interpreter)."""
    if impl is None:
        return "triton" if device.type == "cuda" else "c"
    if impl not in ("c", "triton"):
        raise ValueError(f"impl must be 'c', 'triton' or None (by device), got {impl!r}")
    return impl
