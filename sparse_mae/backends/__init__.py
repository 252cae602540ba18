"""Encoder backends: one interface (`EncoderBackend.encode`), several engines.

Each entry is imported lazily so that a missing optional dependency (MinkowskiEngine)
only matters to whoever asks for that backend.
"""
from __future__ import annotations

import importlib

from sparse_mae.backends.base import BackendUnavailableError, EncoderBackend

_REGISTRY: dict[str, str] = {
    "dense_masked": "sparse_mae.backends.dense_masked:DenseMaskedBackend",
    "native": "sparse_mae.backends.native:NativeBackend",
    "minkowski": "sparse_mae.backends.minkowski:MinkowskiBackend",
}


def list_backends() -> list[str]:
    return list(_REGISTRY)


def _backend_class(name: str) -> type[EncoderBackend]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def backend_availability(name: str) -> tuple[bool, str]:
    """(available, reason) without raising for a missing dependency."""
    return _backend_class(name).availability()


def available_backends() -> list[str]:
    return [n for n in _REGISTRY if backend_availability(n)[0]]


# Backends in order of preference for backend=auto: the fastest available one.
AUTO_BACKEND_ORDER = ("native", "dense_masked")


def resolve_backend(name: str) -> str:
    """"auto" -> the fastest backend available here; an explicit name must be available."""
    name = str(name)
    if name == "auto":
        for candidate in AUTO_BACKEND_ORDER:
            if candidate in _REGISTRY and backend_availability(candidate)[0]:
                return candidate
        raise ValueError(f"backend=auto found none of {AUTO_BACKEND_ORDER} available")
    ok, reason = backend_availability(name)
    if not ok:
        raise ValueError(f"backend={name} is not available here: {reason}. Use backend=auto or backend=dense_masked")
    return name


def get_backend(name: str) -> EncoderBackend:
    cls = _backend_class(name)
    ok, reason = cls.availability()
    if not ok:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return cls()


__all__ = [
    "BackendUnavailableError",
    "EncoderBackend",
    "available_backends",
    "backend_availability",
    "get_backend",
    "list_backends",
    "resolve_backend",
]
