"""Model registry: `create_model(name, **kwargs)`, `list_models()`."""
from __future__ import annotations

from sparse_mae.models.convnextv2 import VARIANTS, ConvNeXtV2, build_convnextv2
from sparse_mae.models.fcmae import FCMAE, build_fcmae

_FAMILIES = {"convnextv2": build_convnextv2, "fcmae_convnextv2": build_fcmae}


def list_models() -> list[str]:
    return [f"{family}_{v}" for family in _FAMILIES for v in VARIANTS]


def parse_model_name(name: str) -> tuple[str, str]:
    """'fcmae_convnextv2_atto' -> ('fcmae_convnextv2', 'atto')."""
    family, _, variant = str(name).rpartition("_")
    if family not in _FAMILIES or variant not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return family, variant


def create_model(name: str, **kwargs):
    family, variant = parse_model_name(name)
    return _FAMILIES[family](variant, **kwargs)


__all__ = ["ConvNeXtV2", "FCMAE", "VARIANTS", "create_model", "list_models", "parse_model_name"]
