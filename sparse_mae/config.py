"""Typed config schemas of every Hydra app, registered with Hydra's ConfigStore.

Every default lives here, once. `conf/sparse_mae_conf/<app>.yaml` holds only the defaults
list (which group option is the default), Hydra's own settings and examples;
`conf/sparse_mae_conf/experiment/*.yaml` hold only the differences of an experiment. Because the schemas are dataclasses, Hydra
itself rejects unknown keys, wrong types and unknown choices (enums) when it composes a
config. Ranges are declared on the fields too (`opt(..., check=Range(...))`), and
`validate(cfg)` checks every declared range of a composed config: `apps.app.compose` and
the Hydra entry points call it, so an out-of-range value fails when the config is
composed, with a message naming the key and the allowed range.

Config groups whose options differ by one key are not files: `model=tiny` selects the
option `{variant: tiny}` registered below for every variant, and `backend=` / `logger=`
work the same way, so the remaining defaults of those nodes are the dataclass defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from sparse_mae.backends import list_backends
from sparse_mae.data.fashion_mnist import DEFAULT_ROOT as FASHION_MNIST_ROOT
from sparse_mae.models.convnextv2 import PATCH, VARIANTS
from sparse_mae.train.signals import ALLOWED_STOP_SIGNALS, DEFAULT_STOP_SIGNALS, parse_signals


class ConfigError(ValueError):
    """A config value out of its declared range (apps report it as bad input, exit 2)."""


@dataclass(frozen=True)
class Range:
    """A number within bounds, declared on a schema field. For a list field every element
    is checked, and `length` / `nonempty` / `ascending` constrain the list. None passes:
    whether a field may be null is its type's business, which Hydra checks."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    multiple_of: Optional[int] = None
    length: Optional[int] = None
    nonempty: bool = False
    ascending: bool = False
    hint: str = ""  # appended to the error, e.g. what the paper uses

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        else:
            text = "a number"
        if self.multiple_of:
            text += f" and a multiple of {self.multiple_of}"
        return text

    def _fits(self, x) -> bool:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            return False
        if self.low is not None and (x <= self.low if self.low_open else x < self.low):
            return False
        if self.high is not None and (x >= self.high if self.high_open else x > self.high):
            return False
        return not self.multiple_of or x % self.multiple_of == 0

    def problem(self, value: Any) -> Optional[str]:
        """None if `value` fits, else what it must be."""
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            what = f"a list of {self.length} numbers" if self.length else "a list of numbers"
            shape_ok = (self.length is None or len(value) == self.length) and (value or not self.nonempty)
            order_ok = not self.ascending or all(a <= b for a, b in zip(value, value[1:]))
            if shape_ok and order_ok and all(self._fits(x) for x in value):
                return None
            return (f"{'a non-empty list' if self.nonempty and not self.length else what}, each {self.describe()}"
                    + (", in ascending order (min, max)" if self.ascending else ""))
        return None if self._fits(value) else self.describe()


@dataclass(frozen=True)
class OneOf:
    """A string among a few words (case-insensitive), for fields that Hydra must keep as
    strings because `true`/`false` are among them."""

    words: tuple[str, ...]

    def problem(self, value: Any) -> Optional[str]:
        return None if str(value).lower() in self.words else f"one of {', '.join(self.words)}"


@dataclass(frozen=True)
class NonEmpty:
    """A list with at least one entry (the entries' own type is Hydra's to check)."""

    def problem(self, value: Any) -> Optional[str]:
        return None if value is None or len(value) else "a non-empty list"


@dataclass(frozen=True)
class SizePairs:
    """A non-empty list of [width, height] pairs of positive integers."""

    def problem(self, value: Any) -> Optional[str]:
        ok = value and all(isinstance(p, list) and len(p) == 2 and all(isinstance(v, int) and v > 0 for v in p)
                           for p in value)
        return None if ok else "a non-empty list of [width, height] pairs, each > 0"


@dataclass(frozen=True)
class StopSignalNames:
    """A list of signals a run may stop on (train.signals.ALLOWED_STOP_SIGNALS)."""

    def problem(self, value: Any) -> Optional[str]:
        try:
            parse_signals(value or [])
        except ValueError:
            return f"a list of signals a run may stop on, among {', '.join(ALLOWED_STOP_SIGNALS)}"
        return None


# a bench backend name with this suffix runs that backend's model under torch.compile: the
# reference a user would pick instead of a sparse engine (dense_masked+compile)
COMPILED = "+compile"


@dataclass(frozen=True)
class Registered:
    """`all`, or a non-empty list naming at least one registered backend, each optionally
    with the +compile suffix (the bench lists the others as skipped)."""

    def problem(self, value: Any) -> Optional[str]:
        if value in ("all", None):
            return None
        names = [value] if isinstance(value, str) else list(value)
        if names and any(str(n).removesuffix(COMPILED) in list_backends() for n in names):
            return None
        return (f"all, or a list naming at least one registered backend ({', '.join(list_backends())}), "
                f"each optionally under torch.compile (e.g. dense_masked{COMPILED})")


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
PATCH_MULTIPLE = Range(PATCH, multiple_of=PATCH, hint="the patch size")
AREA_RANGE = Range(0, 1, low_open=True, length=2, ascending=True)
MASK_RATIO = Range(0, 1, low_open=True, high_open=True, hint="the paper uses 0.6")


def opt(default: Any, help: str, check: Any = None) -> Any:  # noqa: A002 - `help` reads best at the call sites
    """A schema field with its default, the help line `--help` prints for it and, where the
    type alone does not say it, the range `validate` checks."""
    metadata = {"help": help, "check": check}
    if isinstance(default, (list, dict)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: _copy(value), metadata=metadata)
    return field(default=default, metadata=metadata)


def _copy(value):
    import copy

    return copy.deepcopy(value)


class Choice(str, Enum):
    """A closed set of strings: Hydra rejects anything else and names the valid ones."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


Variant = Choice("Variant", [(v, v) for v in VARIANTS])
BackendName = Choice("BackendName", [(b, b) for b in ("auto", *list_backends())])
Device = Choice("Device", [(d, d) for d in ("auto", "cpu", "cuda")])
LoggerName = Choice("LoggerName", [(n, n) for n in ("wandb", "none")])
WandbMode = Choice("WandbMode", [(m, m) for m in ("offline", "online", "disabled")])
LayoutFormat = Choice("LayoutFormat", [(f, f) for f in ("sparse_mae", "timm", "official_dense", "official_fcmae")])
ExportFormat = Choice("ExportFormat", [(f, f) for f in (*LayoutFormat.__members__, "onnx")])
InitFormat = Choice("InitFormat", [(f, f) for f in ("auto", *LayoutFormat.__members__)])
DType = Choice("DType", [(d, d) for d in ("float32", "bfloat16", "float16")])


# -- groups ------------------------------------------------------------------------------

@dataclass
class FcmaeModelConfig:
    variant: Variant = opt(MISSING, "encoder variant; `model=<variant>` sets it")
    decoder_dim: int = opt(512, "width of the decoder's ConvNeXt block (paper: 512)", POSITIVE)
    decoder_depth: int = opt(1, "decoder blocks (paper: 1)", POSITIVE)
    norm_pix_loss: bool = opt(True, "loss on per-patch normalised pixels (paper)")
    drop_path_rate: float = opt(0.0, "stochastic depth of the encoder", Range(0, 1, high_open=True))


@dataclass
class ClassifierModelConfig:
    variant: Variant = opt(MISSING, "classifier variant; must match the pretrained checkpoint")
    drop_path_rate: float = opt(0.1, "stochastic depth (paper atto fine-tuning recipe: 0.1)",
                                Range(0, 1, high_open=True))


@dataclass
class BackendConfig:
    name: BackendName = opt(MISSING, "encoder engine; auto: native where available, else dense_masked")


@dataclass
class DataConfig:
    """What every data option has."""

    name: str = opt(MISSING, "which data option this is (set by the group)")
    size: int = opt(224, f"crop fed to the model, a multiple of {PATCH} (the patch size)", PATCH_MULTIPLE)
    scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range (pretraining recipe)", AREA_RANGE)
    hflip: float = opt(0.5, "probability of a horizontal flip", PROBABILITY)
    num_workers: int = opt(2, "DataLoader worker processes", NON_NEGATIVE)


@dataclass
class DrawnImages:
    """Procedurally drawn images (sparse_mae/data/builtin.py): no download."""

    draw_size: int = opt(256, "images are drawn at this size, then cropped and resized", POSITIVE)
    seed: int = opt(0, "which images are drawn (fine-tuning: the training images; val uses seed + 1)")


@dataclass
class FolderImages:
    root: str = opt(MISSING, "the folder of images (required)")
    num_workers: int = opt(8, "DataLoader worker processes (decoding files wants more than drawing)", NON_NEGATIVE)


@dataclass
class FinetuneCrop:
    scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop area range (fine-tuning recipe)", AREA_RANGE)


@dataclass
class BuiltinData(DrawnImages, DataConfig):
    name: str = "builtin"
    num_images: int = opt(2048, "dataset length", POSITIVE)


@dataclass
class ImageFolderData(FolderImages, DataConfig):
    """Every jpg/jpeg/png/webp/bmp under root, recursively (no labels needed)."""

    name: str = "imagefolder"


@dataclass
class LabelledBuiltinData(FinetuneCrop, DrawnImages, DataConfig):
    name: str = "builtin"
    num_train: int = opt(2048, "training images (8 classes of drawn patterns)", POSITIVE)
    num_val: int = opt(512, "validation images, never seen in training", POSITIVE)


@dataclass
class LabelledImageFolderData(FinetuneCrop, FolderImages, DataConfig):
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg (classes sorted by name)."""

    name: str = "imagefolder"


@dataclass
class ShardImages:
    root: str = opt(MISSING, "a shard folder written by `sparse-mae prepare` (required)")
    num_workers: int = opt(4, "DataLoader worker processes (decoding reduced JPEGs wants fewer than files)",
                           NON_NEGATIVE)
    decode: str = opt("cpu", "cpu: the loader's workers decode and augment (libjpeg at reduced size); gpu: the "
                             "workers only read the JPEG bytes and draw the crops, the training GPU decodes (nvjpeg "
                             "through torchvision) and augments; needs CUDA and torchvision (docs/data.md)",
                      OneOf(("cpu", "gpu")))


@dataclass
class ShardData(ShardImages, DataConfig):
    """Indexed shards from `sparse-mae prepare` (random access; damaged samples skipped, counted)."""

    name: str = "shards"


@dataclass
class LabelledShardData(FinetuneCrop, ShardImages, DataConfig):
    """root/train and root/val: shard folders prepared from ImageNet-style class folders (or from the
    Fashion-MNIST idx files: then data.size=128 as data=fashion_mnist)."""

    name: str = "shards"


@dataclass
class FashionMnistImages:
    """Fashion-MNIST idx files (sparse_mae/data/fashion_mnist.py): 28px grey, 10 classes, 3 equal channels."""

    root: str = opt(FASHION_MNIST_ROOT, "folder of the four idx files, .gz or not (Debian: apt-get install "
                                        "dataset-fashion-mnist)")
    size: int = opt(128, "28px padded to 32, then upsampled 4x: 4x4 patches (docs/fashion-mnist/README.md)")
    num_workers: int = opt(1, "DataLoader worker processes (the images are in memory; the model needs the cores)",
                           NON_NEGATIVE)


@dataclass
class FashionMnistData(FashionMnistImages, DataConfig):
    """The 60,000 training images of Fashion-MNIST (labels unused)."""

    name: str = "fashion_mnist"
    num_images: Optional[int] = opt(None, "use the first N training images; null: all 60,000", POSITIVE)


@dataclass
class LabelledFashionMnistData(FinetuneCrop, FashionMnistImages, DataConfig):
    """Fashion-MNIST: train = the training split (or a class-balanced fraction of it), val = the test split."""

    name: str = "fashion_mnist"
    label_fraction: float = opt(1.0, "class-balanced random fraction of the 60,000 training labels used",
                                Range(0, 1, low_open=True))
    label_seed: int = opt(0, "which images that fraction holds")
    num_val: Optional[int] = opt(None, "the first N of the 10,000 test images; null: all", POSITIVE)


@dataclass
class LoggerConfig:
    name: LoggerName = opt(MISSING, "wandb, or none (metrics.jsonl and the progress bar only)")
    mode: WandbMode = opt("offline", "wandb: offline writes under the run directory; online syncs live")
    project: str = opt("sparse-mae", "wandb project")
    entity: Optional[str] = opt(None, "wandb entity (team); null: your default")
    run_name: Optional[str] = opt(None, "wandb run name; null: the run directory's name")
    tags: list[str] = opt([], "wandb tags")
    progress: bool = opt(True, "tqdm progress bar on stderr")


# -- the training engine's part, shared by pretrain and finetune --------------------------

@dataclass
class OptimConfig:
    blr: float = opt(1.5e-4, "base lr: lr = blr * effective_batch / 256", POSITIVE)
    lr: Optional[float] = opt(None, "absolute lr; overrides blr when set", POSITIVE)
    betas: list[float] = opt([0.9, 0.95], "AdamW betas", Range(0, 1, high_open=True, length=2))
    weight_decay: float = opt(0.05, "AdamW weight decay (none on biases, norms, GRN, mask token)", NON_NEGATIVE)
    eps: float = opt(1.0e-8, "AdamW eps", POSITIVE)


@dataclass
class SchedConfig:
    warmup_epochs: float = opt(40.0, "linear warmup, then half-cosine to min_lr, per step", NON_NEGATIVE)
    warmup_steps: Optional[int] = opt(None, "overrides warmup_epochs when set", NON_NEGATIVE)
    min_lr: float = opt(0.0, "lr at the end of the schedule", NON_NEGATIVE)


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "checkpoint cadence in optimizer steps; also written at the end", POSITIVE)
    keep_last: int = opt(3, "checkpoints of this run kept (oldest deleted first); 0 keeps all", NON_NEGATIVE)


@dataclass
class NonFiniteConfig:
    max_in_a_row: int = opt(3, "a step with a non-finite loss or gradient norm is skipped and counted; "
                               "this many in a row stop the run", POSITIVE)


@dataclass
class RunConfig:
    """Everything sparse_mae.train's engine reads."""

    seed: int = opt(0, "seeds data order, augmentation, masks and init", NON_NEGATIVE)
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    amp: str = opt("auto", "bf16 autocast: auto (on for CUDA where the backend supports it), true, false",
                   OneOf(("auto", "true", "false")))
    epochs: int = opt(MISSING, "length of the lr schedule and of the run", POSITIVE)
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (the schedule still spans epochs)",
                                   POSITIVE)
    batch_size: int = opt(MISSING, "per process; effective batch = batch_size * processes * accum_iter", POSITIVE)
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)", POSITIVE)
    clip_grad: Optional[float] = opt(None, "max gradient norm, or null for none", POSITIVE)
    log_every_steps: int = opt(10, "metrics.jsonl / wandb / progress-bar averages", POSITIVE)
    output_dir: str = opt(MISSING, "the run directory: checkpoints, metrics, pictures")
    resume: Optional[str] = opt(None, "null: start fresh (refused where checkpoints exist); auto: the newest "
                                      "checkpoint of output_dir that verifies, or fresh; or a checkpoint path")
    stop_signals: list[str] = opt(list(DEFAULT_STOP_SIGNALS), "on one of these the run finishes its step, "
                                  "writes a checkpoint and exits 75 (resume=auto continues); a second one exits at "
                                  "once. USR2 is submitit's time-limit signal", StopSignalNames())
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "")
    nonfinite: NonFiniteConfig = opt(NonFiniteConfig(), "")
    optim: OptimConfig = opt(OptimConfig(), "")
    sched: SchedConfig = opt(SchedConfig(), "")
    logger: LoggerConfig = opt(LoggerConfig(), "")


# -- apps --------------------------------------------------------------------------------

@dataclass
class ReconConfig:
    every_steps: int = opt(1000, "reconstruction PNG cadence; also written at the end; 0: only at the end",
                           NON_NEGATIVE)
    num_images: int = opt(4, "fixed images shown (the same at every picture, across resumes)", NON_NEGATIVE)


@dataclass
class KnnMonitorConfig:
    """kNN accuracy on frozen encoder features during pretraining (sparse_mae/probe/monitor.py)."""

    enabled: bool = opt(False, "embed a fixed labelled subset every `every_steps` and log kNN top-1/top-5")
    every_steps: int = opt(1000, "cadence in optimizer steps; also at the end of the run", POSITIVE)
    num_train: int = opt(1000, "memory bank: this many training images, evenly spaced over the split", POSITIVE)
    num_val: int = opt(500, "queries: this many val images, evenly spaced over the split", POSITIVE)
    k: int = opt(20, "neighbours voting (self-supervised literature: 20)", POSITIVE)
    temperature: float = opt(0.07, "votes weighted exp(cosine / temperature)", POSITIVE)
    batch_size: int = opt(64, "images per forward while embedding", POSITIVE)
    root: Optional[str] = opt(None, "labelled images for the monitor (root/train/<class>/, root/val/<class>/, or "
                                    "root/train and root/val shard folders); null: the pretraining data's own "
                                    "labels (builtin, fashion_mnist)")


@dataclass
class PretrainConfig(RunConfig):
    model: FcmaeModelConfig = opt(FcmaeModelConfig(), "")
    backend: BackendConfig = opt(BackendConfig(), "")
    data: DataConfig = opt(MISSING, "")
    mask_ratio: float = opt(0.6, f"fraction of {PATCH}x{PATCH} patches removed (paper: 0.6)", MASK_RATIO)
    init: Optional[str] = opt(None, "start a fresh run from these weights (any format `import` reads); "
                                    "a resumed run keeps its checkpoint's weights")
    init_format: InitFormat = opt("auto", "layout of init: auto (from the key names) or a format name")
    epochs: int = opt(800, "length of the lr schedule and of the run", POSITIVE)
    batch_size: int = opt(64, "per process; effective batch = batch_size * processes * accum_iter", POSITIVE)
    output_dir: str = opt("outputs/pretrain/${now:%Y-%m-%d_%H-%M-%S}", "the run directory")
    recon: ReconConfig = opt(ReconConfig(), "")

    @staticmethod
    def relations(node) -> Optional[str]:
        """The image must have a patch to mask and one to keep: at data.size=32 the one patch
        was kept, nothing was masked, and the loss over no patches was NaN."""
        if OmegaConf.is_missing(node, "data") or OmegaConf.is_missing(node, "mask_ratio"):
            return None
        size, ratio = node.data.size, node.mask_ratio
        patches = (size // PATCH) ** 2
        if max(1, int(patches * (1 - ratio))) < patches:
            return None
        return (f"data.size={size} gives {patches} patch(es) of {PATCH}x{PATCH} and mask_ratio={ratio} keeps all "
                f"of them, so there is nothing to reconstruct; use data.size >= {2 * PATCH} or a higher mask_ratio")
    knn: KnnMonitorConfig = opt(KnnMonitorConfig(), "")


@dataclass
class EmaConfig:
    enabled: bool = opt(True, "keep an exponential moving average of the weights")
    decay: float = opt(0.9999, "paper; short runs need a lower decay (e.g. 0.99) for the EMA to move",
                       Range(0, 1, low_open=True, high_open=True))
    evaluate: bool = opt(True, "also evaluate the EMA weights (the best of both is reported)")


@dataclass
class MixupConfig:
    mixup_alpha: float = opt(0.0, "> 0 enables mixup (paper: 0.8)", NON_NEGATIVE)
    cutmix_alpha: float = opt(0.0, "> 0 enables cutmix (paper: 1.0)", NON_NEGATIVE)
    prob: float = opt(1.0, "probability of mixing a batch", PROBABILITY)
    switch_prob: float = opt(0.5, "with both enabled: probability of cutmix instead of mixup", PROBABILITY)


@dataclass
class FinetuneConfig(RunConfig):
    model: ClassifierModelConfig = opt(ClassifierModelConfig(), "")
    data: DataConfig = opt(MISSING, "")
    pretrained: Optional[str] = opt(None, "encoder weights (our checkpoint, an import, or any format import "
                                          "reads); null: random init")
    pretrained_format: InitFormat = opt("auto", "layout of pretrained: auto (from the key names) or a format")
    layer_decay: float = opt(0.9, "lr scale = layer_decay ** (13 - layer id), head 1 (ConvNeXt V2 recipe); "
                                     "1 = no decay", Range(0, 1, low_open=True))
    label_smoothing: float = opt(0.2, "label smoothing (paper: 0.2)", Range(0, 1, high_open=True))
    ema: EmaConfig = opt(EmaConfig(), "")
    mixup: MixupConfig = opt(MixupConfig(), "")
    eval_every_epochs: int = opt(1, "evaluation cadence; also evaluated at the end", POSITIVE)
    epochs: int = opt(100, "length of the lr schedule and of the run")
    batch_size: int = opt(32, "per process; effective batch = batch_size * processes * accum_iter", POSITIVE)
    output_dir: str = opt("outputs/finetune/${now:%Y-%m-%d_%H-%M-%S}", "the run directory")
    # the fine-tuning recipe of the paper for atto, where it differs from pretraining's
    optim: OptimConfig = opt(OptimConfig(blr=2.0e-4, betas=[0.9, 0.999], weight_decay=0.3),
                             "AdamW (paper atto fine-tuning: blr 2e-4, betas 0.9/0.999, wd 0.3)")
    sched: SchedConfig = opt(SchedConfig(warmup_epochs=5.0), "5 warmup epochs, then half-cosine")


@dataclass
class EvalConfig:
    data: DataConfig = opt(MISSING, "")
    ckpt: str = opt(MISSING, "a finetune checkpoint, `sparse-mae export format=sparse_mae` output, or an import")
    use_ema: bool = opt(True, "evaluate the EMA weights when the checkpoint has them")
    batch_size: int = opt(64, "images per forward", POSITIVE)
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    out: Optional[str] = opt(None, "folder for confusion_matrix.png and eval.json; null: beside the checkpoint")


@dataclass
class ProbeModelConfig:
    variant: Variant = opt(MISSING, "encoder variant; must match ckpt")


@dataclass
class KnnConfig:
    k: int = opt(20, "neighbours voting (self-supervised literature: 20)", POSITIVE)
    temperature: float = opt(0.07, "votes weighted exp(cosine / temperature)", POSITIVE)


@dataclass
class LinearProbeConfig:
    epochs: int = opt(100, "passes over the frozen training features", POSITIVE)
    batch_size: int = opt(256, "features per SGD step", POSITIVE)
    lr: float = opt(0.1, "SGD lr (momentum 0.9, half-cosine to 0) at batch 256, scaled linearly with batch_size",
                    POSITIVE)
    weight_decay: float = opt(0.0, "MAE's linear probe uses none", NON_NEGATIVE)


@dataclass
class ProbeConfig:
    """Linear probe and kNN on frozen encoder features (global average pool + the final LayerNorm)."""

    model: ProbeModelConfig = opt(ProbeModelConfig(), "")
    data: DataConfig = opt(MISSING, "")
    ckpt: Optional[str] = opt(None, "encoder weights: any checkpoint `import` reads (pretrain, finetune, export, "
                                    "timm, official); null: a random-init encoder of model=")
    ckpt_format: InitFormat = opt("auto", "layout of ckpt: auto (from the key names) or a format name")
    knn: KnnConfig = opt(KnnConfig(), "")
    linear: LinearProbeConfig = opt(LinearProbeConfig(), "")
    batch_size: int = opt(64, "images per forward while embedding", POSITIVE)
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    amp: str = opt("auto", "bf16 autocast while embedding: auto (on for CUDA), true, false",
                   OneOf(("auto", "true", "false")))
    seed: int = opt(0, "random-init encoder, the linear probe's init and shuffling", NON_NEGATIVE)
    out: Optional[str] = opt(None, "write probe.json here (a folder); null: print only")


@dataclass
class OnnxConfig:
    opset: int = opt(17, "ONNX opset", POSITIVE)
    image_size: int = opt(224, "example input for tracing; batch is dynamic, H and W fixed", PATCH_MULTIPLE)


@dataclass
class ExportConfig:
    ckpt: str = opt(MISSING, "our checkpoint (pretrain step-*.pt, an import, a fine-tuned checkpoint)")
    format: ExportFormat = opt("sparse_mae", "sparse_mae | timm | official_dense | official_fcmae | onnx")
    out: str = opt(MISSING, ".safetensors (default layout) or .pt; .onnx for onnx")
    variant: Optional[Variant] = opt(None, "null: detected from the shapes; else it must match")
    head: bool = opt(False, "encoder-only sources: add a fresh head (needs num_classes)")
    num_classes: Optional[int] = opt(None, "classes of the fresh head", POSITIVE)
    strict: bool = opt(True, "false: ignore unexpected keys in ckpt")
    check: bool = opt(True, "check the conversion: dense converted model vs the sparse encoder")
    check_backends: Optional[list[str]] = opt(None, "backends for the check; null: all available here")
    onnx: OnnxConfig = opt(OnnxConfig(), "")


@dataclass
class ImportConfig:
    ckpt: str = opt(MISSING, "plain state dict, or wrapped under 'model' / 'state_dict'; .pt/.pth/.safetensors")
    format: LayoutFormat = opt(MISSING, "official_fcmae (gives our FCMAE model) | official_dense | timm | sparse_mae")
    out: str = opt(MISSING, "our checkpoint, a .pt file (.safetensors also accepted)")
    variant: Optional[Variant] = opt(None, "null: detected from the shapes; else it must match")
    strict: bool = opt(True, "false: ignore unexpected keys")


@dataclass
class PrepareConfig:
    src: str = opt(MISSING, "the image folder (ImageNet layout src/<class>/*.jpg gives labels; any other: none), "
                            "or a folder of the four Fashion-MNIST idx files (-> out/train and out/val, labelled)")
    out: str = opt(MISSING, "the shard folder to write; run the same command again to continue an interrupted one")
    short_side: Optional[int] = opt(256, "each image shrunk so its shorter side is at most this; null: kept "
                                         "(Fashion-MNIST: stored losslessly at 32px)", POSITIVE)
    quality: int = opt(90, "JPEG quality of the re-encoded images (Fashion-MNIST: lossless PNG)", Range(1, 100))
    shard_size: int = opt(1000, "source images per shard (the unit that an interrupted run keeps)", POSITIVE)
    workers: Optional[int] = opt(None, "processes; null: every core", POSITIVE)
    progress: bool = opt(True, "tqdm progress bar on stderr")


BenchSuite = Choice("BenchSuite", [(s, s) for s in ("step", "loader")])


@dataclass
class LoaderBenchConfig:
    """bench=loader: folder vs shard decode per core, and pretrain from shards vs the bench step."""

    images: int = opt(48, "generated JPEGs per size (decode rates are per image)", POSITIVE)
    jpeg_sizes: list[list[int]] = opt([[500, 375], [1600, 1200]], "width x height of the generated JPEGs",
                                      SizePairs())
    end_to_end: bool = opt(True, "also time `pretrain data=shards` next to the bench step, at the first backend, "
                                  "variant, batch size and dtype of the lists")
    pretrain_steps: int = opt(12, "steps of that pretrain run (the first log window is left out)", Range(5))
    work_dir: Optional[str] = opt(None, "where the JPEGs and shards are kept (reused); null: under output_dir")


@dataclass
class BenchConfig:
    """Every backend x variant x mask ratio x batch size x dtype is one configuration (one row)."""

    suite: BenchSuite = opt("step", "step: the FCMAE step grid; loader: the data loader (bench=loader)")
    loader: LoaderBenchConfig = opt(LoaderBenchConfig(), "")

    backends: Any = opt("all", "all registered backends, or a list; those not installed are listed as skipped",
                        Registered())
    variants: list[Variant] = opt(["atto"], "encoder variants", NonEmpty())
    mask_ratios: list[float] = opt([0.6], "fractions of patches removed",
                                   Range(0, 1, low_open=True, high_open=True, nonempty=True, hint="the paper uses 0.6"))
    batch_sizes: list[int] = opt([8], "images per step", Range(1, nonempty=True))
    dtypes: list[DType] = opt(["float32"], "bfloat16 / float16 run under autocast, where the backend supports it",
                              NonEmpty())
    image_size: int = opt(224, f"square images of this side, a multiple of {PATCH}", PATCH_MULTIPLE)
    warmup: int = opt(2, "untimed calls before the timed ones", NON_NEGATIVE)
    repeats: int = opt(5, "timed calls; median and IQR are reported", POSITIVE)
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    threads: Optional[int] = opt(None, "torch intra-op threads; null: torch's default (all cores)", POSITIVE)
    isolate: bool = opt(True, "a fresh process per configuration: clean memory numbers, a crash stays local")
    memory_guard_gib: Optional[float] = opt(None, "most memory one configuration may add; over it: recorded as oom",
                                            POSITIVE)
    peak_tflops: Optional[float] = opt(None, "the card's peak for MFU; null: known GPUs, else the measured matmul peak",
                                       POSITIVE)
    measure_peak: bool = opt(True, "time this machine's matmul peak per dtype before and after the grid")
    peak_size: int = opt(2048, "that matmul is peak_size^3", Range(64))
    gomp_spincount: Optional[int] = opt(2000, "isolated workers' GOMP_SPINCOUNT: spins of torch's OpenMP threads "
                                              "before they sleep (libgomp's 300000 fights other processes on a "
                                              "shared CPU; 0 = passive); null: inherit", NON_NEGATIVE)
    timeout_s: float = opt(1800.0, "per configuration (isolated runs)", POSITIVE)
    plots: bool = opt(True, "PNG plots beside the tables")
    seed: int = opt(0, "weights, images and masks")
    output_dir: str = opt("outputs/bench/${now:%Y-%m-%d_%H-%M-%S}", "results.csv / .json / .md and plots")


def check_output_dir(value: str) -> str | None:
    """RunConfig.output_dir: an empty one made the run write into the working directory; a
    file, or a folder that cannot be written, failed inside Hydra's log handler."""
    import os
    from pathlib import Path

    if not str(value).strip():
        return "output_dir is empty; name the run directory, e.g. output_dir=runs/atto"
    path = Path(str(value)).absolute()
    if path.exists() and not path.is_dir():
        return f"output_dir={value} is a file, not a folder; pass a folder for the run (it is created if missing)"
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        return (f"output_dir={value} cannot be written: {existing} is read-only for this user; pass an output_dir "
                f"on a writable filesystem")
    return None


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
    for variant in VARIANTS:
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


register()


# -- ranges --------------------------------------------------------------------------------

def validate(cfg) -> None:
    """Check every range declared on the fields (`opt(..., check=...)`) of a composed config,
    nested nodes included; raises ConfigError naming the key, the allowed range and the value.
    Nodes not built from a schema (plain dicts) carry no ranges and pass."""
    from omegaconf import DictConfig, OmegaConf

    def walk(node: DictConfig, prefix: str) -> None:
        schema = OmegaConf.get_type(node)
        checks = {f.name: f.metadata.get("check") for f in fields(schema)} if is_dataclass(schema) else {}
        for key in node:
            if OmegaConf.is_missing(node, key):
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")
                continue
            check = checks.get(key)
            if check is None:
                continue
            value = OmegaConf.to_container(node, resolve=False, enum_to_str=True)[key] \
                if OmegaConf.is_list(child) else node[key]
            if isinstance(value, Enum):
                value = value.value
            problem = check.problem(value)
            if problem is not None:
                hint = f" ({check.hint})" if getattr(check, "hint", "") else ""
                raise ConfigError(f"invalid config: {prefix}{key} must be {problem}{hint}, got {_shown(value)}")
        relation = getattr(schema, "relations", None)  # a schema's checks across its fields
        if relation is not None:
            problem = relation(node)
            if problem is not None:
                raise ConfigError(f"invalid config: {problem}")

    walk(cfg, "")


# -- help ----------------------------------------------------------------------------------

def describe(cfg) -> list[str]:
    """`key: value  # help` for every key of a composed config, nested nodes indented; the
    help comes from the field of the dataclass each node was built from."""
    from omegaconf import DictConfig, OmegaConf

    def walk(node: DictConfig, indent: str) -> list[str]:
        schema = OmegaConf.get_type(node)
        helps = {f.name: f.metadata.get("help", "") for f in fields(schema)} if is_dataclass(schema) else {}
        lines = []
        for key in node:
            text = f"  # {helps[key]}" if helps.get(key) else ""
            if OmegaConf.is_missing(node, key):
                lines.append(f"{indent}{key}: ???{text}")
                continue
            value = node._get_node(key)
            if isinstance(value, DictConfig):
                doc = (OmegaConf.get_type(value).__doc__ or "").strip()
                if not text and doc and not doc.startswith(f"{OmegaConf.get_type(value).__name__}("):
                    text = f"  # {doc.splitlines()[0]}"  # the schema's own docstring, not dataclass's signature
                lines.append(f"{indent}{key}:{text}")
                lines += walk(value, indent + "  ")
            else:
                lines.append(f"{indent}{key}: {_shown(OmegaConf.to_container(node, enum_to_str=True)[key])}{text}")
        return lines

    return walk(cfg, "")


def _shown(value) -> str:
    """A value as it is typed on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)
