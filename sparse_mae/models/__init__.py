"""The models and their names: `list_models()`, `parse_model_name`. They import no backend
and no kernel package; `sparse_mae.create_model` (sparse_mae/build.py) builds one by name
together with its encoder backend."""
from __future__ import annotations

from sparse_mae.models.convnextv2 import VARIANTS, ConvNeXtV2, build_convnextv2
from sparse_mae.models.fcmae import FCMAE, build_fcmae

FAMILIES = {"convnextv2": build_convnextv2, "fcmae_convnextv2": build_fcmae}


def list_models() -> list[str]:
    return [f"{family}_{v}" for family in FAMILIES for v in VARIANTS]


def parse_model_name(name: str) -> tuple[str, str]:
    """'fcmae_convnextv2_atto' -> ('fcmae_convnextv2', 'atto')."""
    family, _, variant = str(name).rpartition("_")
    if family not in FAMILIES or variant not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")
    return family, variant


__all__ = ["ConvNeXtV2", "FAMILIES", "FCMAE", "VARIANTS", "list_models", "parse_model_name"]
