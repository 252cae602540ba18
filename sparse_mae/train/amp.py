"""The bf16 autocast policy: whether a run (or the bench, or the probe) uses bf16 autocast on
its device, and whether this CPU multiplies bf16 matrices fast enough for it to pay."""
from __future__ import annotations

import warnings

import torch


def resolve_amp(amp: str, device: torch.device, autocast_devices: tuple[str, ...] = ("cpu", "cuda"),
                what: str = "this model") -> bool:
    """`amp` (auto | true | false) -> whether to autocast to bf16. auto: on CUDA where the model
    has autocast there, never on a CPU; true where the device has none is bad input; true on
    a CPU without fast bf16 warns (it would train slower)."""
    amp = str(amp).lower()
    if amp == "auto":
        return device.type == "cuda" and "cuda" in autocast_devices
    if amp == "true" and device.type not in autocast_devices:
        raise ValueError(f"amp=true but {what} has no autocast on {device.type}; use amp=false")
    if amp == "true" and device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn(SLOW_BF16_CPU + "; amp=false trains in float32, faster here", stacklevel=2)
    return amp == "true"


# Without bf16 support in oneDNN (x86 CPUs before AVX-512, e.g. AMD Zen 3) torch multiplies
# bf16 matrices in a fallback that runs at a few percent of its float32 speed (measured on
# a Zen 3: 0.85 against 22 GFLOP/s), so bf16 autocast there makes training slower, not faster.
SLOW_BF16_CPU = ("this CPU has no fast bf16 matrix multiply (oneDNN reports no bf16 support: x86 without "
                 "AVX-512), so bf16 autocast runs its matmuls many times slower than float32")


def cpu_has_fast_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
