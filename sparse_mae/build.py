"""`create_model(name, backend=..., **kwargs)`: a model by name, with its encoder engine.

One layer above both the models and the backends: the models import no backend (FCMAE and
SparK are handed a backend object), so the factory that picks an engine by name lives here.
"""
from __future__ import annotations

from sparse_mae.backends import get_backend
from sparse_mae.backends.base import EncoderBackend
from sparse_mae.models import FAMILIES, PRETRAINING_FAMILIES, parse_model_name

DEFAULT_BACKEND = "dense_masked"


def create_model(name: str, backend: str | EncoderBackend | None = None, **kwargs):
    """'convnextv2_<variant>' / 'resnet50' etc. -> the dense classifier; 'fcmae_convnextv2_<variant>'
    -> FCMAE and 'spark_<resnet variant>' -> SparK, whose encoder runs on `backend` (a name from
    `list_backends()` or a backend object; dense_masked when not given). Other keyword
    arguments go to the model."""
    family, variant = parse_model_name(name)
    build = FAMILIES[family][0]
    if family in PRETRAINING_FAMILIES:
        if not isinstance(backend, EncoderBackend):
            backend = get_backend(DEFAULT_BACKEND if backend is None else str(backend))
        return build(variant, backend=backend, **kwargs)
    if backend is not None:
        raise ValueError(f"{name} is a dense classifier and runs no encoder backend; "
                         f"backend= applies to the pretraining models ({', '.join(PRETRAINING_FAMILIES)})")
    return build(variant, **kwargs)


__all__ = ["DEFAULT_BACKEND", "create_model"]
