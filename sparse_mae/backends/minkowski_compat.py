"""The one place that imports MinkowskiEngine (ME).

ME 0.5.4 does `from collections import Sequence` (removed in Python 3.10); the aliases
below put the `collections.abc` names back before the import. Everything that needs ME
goes through `import_minkowski()` so the shim lives here only.
"""
from __future__ import annotations

import collections
import collections.abc
import warnings
from types import ModuleType

INSTALL_HINT = (
    "MinkowskiEngine is not installed in this environment; run `make setup` "
    "(or `bash tools/install_minkowski.sh`), which builds MinkowskiEngine 0.5.4 once for "
    "the installed torch (CPU: ~4 min; CUDA: much longer) and caches the wheel under "
    "${SPARSE_MAE_CACHE:-~/.cache/sparse-mae}"
)

# What to run when ME was built without CUDA but the tensors are on a GPU: set up the
# CUDA build of torch, after which install_minkowski.sh builds ME with CUDA to match.
CUDA_REBUILD_COMMAND = "SPARSE_MAE_TORCH=cuda bash tools/setup_env.sh"

_ABC_NAMES = ("Sequence", "Iterable", "Mapping")


def _restore_collections_aliases() -> None:
    for name in _ABC_NAMES:
        if not hasattr(collections, name):
            setattr(collections, name, getattr(collections.abc, name))


def import_minkowski() -> ModuleType:
    """-> the MinkowskiEngine module; raises ImportError (with the install hint) if missing."""
    _restore_collections_aliases()
    try:
        with warnings.catch_warnings():
            # A CPU-only build warns on every import that it has no CUDA; that is expected here.
            warnings.filterwarnings("ignore", message=".*compiled with CPU_ONLY.*")
            import MinkowskiEngine
    except ImportError as err:
        raise ImportError(f"{INSTALL_HINT} (import failed: {err})") from err
    return MinkowskiEngine


def minkowski_import_error() -> str | None:
    """None when ME imports, else why not (for `availability()`, which must not raise)."""
    try:
        import_minkowski()
    except Exception as err:  # a broken build can fail with OSError/RuntimeError, not only ImportError
        return str(err) if isinstance(err, ImportError) else f"{INSTALL_HINT} ({type(err).__name__}: {err})"
    return None


def minkowski_built_with_cuda(ME: ModuleType) -> bool:
    """True if this MinkowskiEngine was compiled with CUDA (a CPU_ONLY build has no GPU
    coordinate maps or kernels, whatever the machine has)."""
    return bool(ME.is_cuda_available())
