"""The closed sets of strings a config key takes (Hydra rejects anything else and names the
valid ones): variants, backends, devices, layouts, dtypes."""
from __future__ import annotations

from sparse_mae.backends import list_backends
from sparse_mae.config.checks import Choice
from sparse_mae.models.convnextv2 import VARIANTS
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS

# any encoder: a ConvNeXt V2 variant (pretrained by FCMAE) or a ResNet (pretrained by SparK)
EncoderVariant = Choice("EncoderVariant", [(v, v) for v in (*VARIANTS, *RESNET_VARIANTS)])
BackendName = Choice("BackendName", [(b, b) for b in ("auto", *list_backends())])
Device = Choice("Device", [(d, d) for d in ("auto", "cpu", "cuda")])
LoggerName = Choice("LoggerName", [(n, n) for n in ("wandb", "none")])
WandbMode = Choice("WandbMode", [(m, m) for m in ("offline", "online", "disabled")])
LayoutFormat = Choice("LayoutFormat", [(f, f) for f in ("sparse_mae", "timm", "official_dense", "official_fcmae",
                                                          "spark")])
ExportFormat = Choice("ExportFormat", [(f, f) for f in (*LayoutFormat.__members__, "onnx")])
InitFormat = Choice("InitFormat", [(f, f) for f in ("auto", *LayoutFormat.__members__)])
DType = Choice("DType", [(d, d) for d in ("float32", "bfloat16", "float16")])
