"""The schemas and the generated group options in Hydra's ConfigStore: `model=tiny` selects
the option {variant: tiny} registered here for every variant, and `backend=` / `logger=` work
the same way, so the remaining defaults of those nodes are the dataclass defaults."""
from __future__ import annotations

from hydra.core.config_store import ConfigStore

from sparse_mae.config.apps import (
    BenchConfig,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    ImportConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
)
from sparse_mae.config.choices import BackendName, LoggerName
from sparse_mae.config.data import (
    BuiltinData,
    FashionMnistData,
    ImageFolderData,
    LabelledBuiltinData,
    LabelledFashionMnistData,
    LabelledImageFolderData,
    LabelledShardData,
    ShardData,
)
from sparse_mae.models.convnextv2 import VARIANTS
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS

SCHEMAS: dict[str, type] = {
    "pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvalConfig,
    "export": ExportConfig, "import": ImportConfig, "bench": BenchConfig, "prepare": PrepareConfig,
    "probe": ProbeConfig,
}


def register() -> None:
    """Put the schemas and the generated group options into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    for app, schema in SCHEMAS.items():
        cs.store(name=f"{app}_schema", node=schema)
    for variant in (*VARIANTS, *RESNET_VARIANTS):  # ResNets: SparK pretraining (pretrain only)
        cs.store(group="model", name=variant, node={"variant": variant})
    for backend in BackendName:
        cs.store(group="backend", name=backend.value, node={"name": backend.value})
    for logger in LoggerName:
        cs.store(group="logger", name=logger.value, node={"name": logger.value})
    cs.store(group="data", name="builtin", node=BuiltinData)
    cs.store(group="data", name="imagefolder", node=ImageFolderData)
    cs.store(group="finetune/data", name="builtin", node=LabelledBuiltinData)
    cs.store(group="finetune/data", name="imagefolder", node=LabelledImageFolderData)
    cs.store(group="data", name="shards", node=ShardData)
    cs.store(group="finetune/data", name="shards", node=LabelledShardData)
    cs.store(group="data", name="fashion_mnist", node=FashionMnistData)
    cs.store(group="finetune/data", name="fashion_mnist", node=LabelledFashionMnistData)
