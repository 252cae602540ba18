"""The models and their names: `list_models()`, `parse_model_name`. They import no backend
and no kernel package; `sparse_mae.create_model` (sparse_mae/build.py) builds one by name
together with its encoder backend.

Names: `convnextv2_<variant>` and `fcmae_convnextv2_<variant>` (ConvNeXt V2 classifier and
FCMAE), `<resnet variant>` as timm spells it (`resnet50`, the dense classifier) and
`spark_<resnet variant>` (SparK pretraining)."""
from __future__ import annotations

from sparse_mae.models.convnextv2 import VARIANTS, ConvNeXtV2, build_convnextv2
from sparse_mae.models.fcmae import FCMAE, build_fcmae
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS
from sparse_mae.models.resnet import ResNet, build_resnet
from sparse_mae.models.spark import SparK, build_spark

# family -> (builder, its variants); the ResNet classifier's names are its variants themselves
FAMILIES = {
    "convnextv2": (build_convnextv2, VARIANTS),
    "fcmae_convnextv2": (build_fcmae, VARIANTS),
    "resnet": (build_resnet, RESNET_VARIANTS),
    "spark": (build_spark, RESNET_VARIANTS),
}
# the pretraining models, whose encoder runs on a backend
PRETRAINING_FAMILIES = ("fcmae_convnextv2", "spark")


def model_name(family: str, variant: str) -> str:
    return variant if family == "resnet" else f"{family}_{variant}"


def pretraining_model_name(variant: str) -> str:
    """The pretraining model of an encoder variant: 'atto' -> 'fcmae_convnextv2_atto' (FCMAE),
    'resnet50' -> 'spark_resnet50' (SparK)."""
    return model_name("spark" if variant in RESNET_VARIANTS else "fcmae_convnextv2", variant)


def list_models() -> list[str]:
    return [model_name(family, v) for family, (_, variants) in FAMILIES.items() for v in variants]


def parse_model_name(name: str) -> tuple[str, str]:
    """'fcmae_convnextv2_atto' -> ('fcmae_convnextv2', 'atto'); 'resnet50' -> ('resnet', 'resnet50');
    'spark_resnet50' -> ('spark', 'resnet50')."""
    for family, (_, variants) in FAMILIES.items():
        for v in variants:
            if model_name(family, v) == str(name):
                return family, v
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(list_models())}")


__all__ = ["ConvNeXtV2", "FAMILIES", "FCMAE", "PRETRAINING_FAMILIES", "RESNET_VARIANTS", "ResNet", "SparK",
           "VARIANTS", "list_models", "model_name", "parse_model_name", "pretraining_model_name"]
