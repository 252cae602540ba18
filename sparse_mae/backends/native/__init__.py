"""The native sparse engine (`backend="native"`): packed patch tiles, our own kernels."""
from sparse_mae.backends.native.engine import NativeBackend
from sparse_mae.backends.native.layout import SparseLayout, StageLayout

__all__ = ["NativeBackend", "SparseLayout", "StageLayout"]
