"""Typed config schemas of every Hydra app, registered with Hydra's ConfigStore.

Every default lives here, once. `conf/<app>.yaml` holds only the defaults list (which
group option is the default), Hydra's own settings and examples; `conf/experiment/*.yaml`
hold only the differences of an experiment. Because the schemas are dataclasses, Hydra
itself rejects unknown keys, wrong types and unknown choices (enums) when it composes a
config; the `check_*` functions below are left with ranges and relations only.

Config groups whose options differ by one key are not files: `model=tiny` selects the
option `{variant: tiny}` registered below for every variant, and `backend=` / `logger=`
work the same way, so the remaining defaults of those nodes are the dataclass defaults.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from sparse_mae.backends import list_backends
from sparse_mae.models.convnextv2 import VARIANTS
from sparse_mae.train.signals import DEFAULT_STOP_SIGNALS


def opt(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best at the call sites
    """A schema field with its default and the help line `--help` prints for it."""
    if isinstance(default, (list, dict)) or is_dataclass(default):
        value = default
        return field(default_factory=lambda: _copy(value), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
    decoder_dim: int = opt(512, "width of the decoder's ConvNeXt block (paper: 512)")
    decoder_depth: int = opt(1, "decoder blocks (paper: 1)")
    norm_pix_loss: bool = opt(True, "loss on per-patch normalised pixels (paper)")
    drop_path_rate: float = opt(0.0, "stochastic depth of the encoder")


@dataclass
class ClassifierModelConfig:
    variant: Variant = opt(MISSING, "classifier variant; must match the pretrained checkpoint")
    drop_path_rate: float = opt(0.1, "stochastic depth (paper atto fine-tuning recipe: 0.1)")


@dataclass
class BackendConfig:
    name: BackendName = opt(MISSING, "encoder engine; auto: native where available, else dense_masked")


@dataclass
class DataConfig:
    """What every data option has."""

    name: str = opt(MISSING, "which data option this is (set by the group)")
    size: int = opt(224, "crop fed to the model, a multiple of 32 (the patch size)")
    scale: list[float] = opt([0.2, 1.0], "RandomResizedCrop area range (pretraining recipe)")
    hflip: float = opt(0.5, "probability of a horizontal flip")
    num_workers: int = opt(2, "DataLoader worker processes")


@dataclass
class DrawnImages:
    """Procedurally drawn images (sparse_mae/data/builtin.py): no download."""

    draw_size: int = opt(256, "images are drawn at this size, then cropped and resized")
    seed: int = opt(0, "which images are drawn (fine-tuning: the training images; val uses seed + 1)")


@dataclass
class FolderImages:
    root: str = opt(MISSING, "the folder of images (required)")
    num_workers: int = opt(8, "DataLoader worker processes (decoding files wants more than drawing)")


@dataclass
class FinetuneCrop:
    scale: list[float] = opt([0.08, 1.0], "RandomResizedCrop area range (fine-tuning recipe)")


@dataclass
class BuiltinData(DrawnImages, DataConfig):
    name: str = "builtin"
    num_images: int = opt(2048, "dataset length")


@dataclass
class ImageFolderData(FolderImages, DataConfig):
    """Every jpg/jpeg/png/webp/bmp under root, recursively (no labels needed)."""

    name: str = "imagefolder"


@dataclass
class LabelledBuiltinData(FinetuneCrop, DrawnImages, DataConfig):
    name: str = "builtin"
    num_train: int = opt(2048, "training images (8 classes of drawn patterns)")
    num_val: int = opt(512, "validation images, never seen in training")


@dataclass
class LabelledImageFolderData(FinetuneCrop, FolderImages, DataConfig):
    """root/train/<class>/*.jpg and root/val/<class>/*.jpg (classes sorted by name)."""

    name: str = "imagefolder"


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
    blr: float = opt(1.5e-4, "base lr: lr = blr * effective_batch / 256")
    lr: Optional[float] = opt(None, "absolute lr; overrides blr when set")
    betas: list[float] = opt([0.9, 0.95], "AdamW betas")
    weight_decay: float = opt(0.05, "AdamW weight decay (none on biases, norms, GRN, mask token)")
    eps: float = opt(1.0e-8, "AdamW eps")


@dataclass
class SchedConfig:
    warmup_epochs: float = opt(40.0, "linear warmup, then half-cosine to min_lr, per step")
    warmup_steps: Optional[int] = opt(None, "overrides warmup_epochs when set")
    min_lr: float = opt(0.0, "lr at the end of the schedule")


@dataclass
class CheckpointConfig:
    every_steps: int = opt(1000, "checkpoint cadence in optimizer steps; also written at the end")
    keep_last: int = opt(3, "checkpoints of this run kept (oldest deleted first); 0 keeps all")


@dataclass
class NonFiniteConfig:
    max_in_a_row: int = opt(3, "a step with a non-finite loss or gradient norm is skipped and counted; "
                               "this many in a row stop the run")


@dataclass
class RunConfig:
    """Everything sparse_mae.train's engine reads."""

    seed: int = opt(0, "seeds data order, augmentation, masks and init")
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    amp: str = opt("auto", "bf16 autocast: auto (on for CUDA where the backend supports it), true, false")
    epochs: int = opt(MISSING, "length of the lr schedule and of the run")
    max_steps: Optional[int] = opt(None, "stop after this many optimizer steps (the schedule still spans epochs)")
    batch_size: int = opt(MISSING, "per process; effective batch = batch_size * processes * accum_iter")
    accum_iter: int = opt(1, "micro-batches per optimizer step (gradient accumulation)")
    clip_grad: Optional[float] = opt(None, "max gradient norm, or null for none")
    log_every_steps: int = opt(10, "metrics.jsonl / wandb / progress-bar averages")
    output_dir: str = opt(MISSING, "the run directory: checkpoints, metrics, pictures")
    resume: Optional[str] = opt(None, "null: start fresh (refused where checkpoints exist); auto: the newest "
                                      "checkpoint of output_dir that verifies, or fresh; or a checkpoint path")
    stop_signals: list[str] = opt(list(DEFAULT_STOP_SIGNALS), "on one of these the run finishes its step, "
                                  "writes a checkpoint and exits 75 (resume=auto continues); a second one exits at "
                                  "once. USR2 is submitit's time-limit signal")
    checkpoint: CheckpointConfig = opt(CheckpointConfig(), "")
    nonfinite: NonFiniteConfig = opt(NonFiniteConfig(), "")
    optim: OptimConfig = opt(OptimConfig(), "")
    sched: SchedConfig = opt(SchedConfig(), "")
    logger: LoggerConfig = opt(LoggerConfig(), "")


# -- apps --------------------------------------------------------------------------------

@dataclass
class ReconConfig:
    every_steps: int = opt(1000, "reconstruction PNG cadence; also written at the end; 0: only at the end")
    num_images: int = opt(4, "fixed images shown (the same at every picture, across resumes)")


@dataclass
class PretrainConfig(RunConfig):
    model: FcmaeModelConfig = opt(FcmaeModelConfig(), "")
    backend: BackendConfig = opt(BackendConfig(), "")
    data: DataConfig = opt(MISSING, "")
    mask_ratio: float = opt(0.6, "fraction of 32x32 patches removed (paper: 0.6)")
    init: Optional[str] = opt(None, "start a fresh run from these weights (any format `import` reads); "
                                    "a resumed run keeps its checkpoint's weights")
    init_format: InitFormat = opt("auto", "layout of init: auto (from the key names) or a format name")
    epochs: int = opt(800, "length of the lr schedule and of the run")
    batch_size: int = opt(64, "per process; effective batch = batch_size * processes * accum_iter")
    output_dir: str = opt("outputs/pretrain/${now:%Y-%m-%d_%H-%M-%S}", "the run directory")
    recon: ReconConfig = opt(ReconConfig(), "")


@dataclass
class EmaConfig:
    enabled: bool = opt(True, "keep an exponential moving average of the weights")
    decay: float = opt(0.9999, "paper; short runs need a lower decay (e.g. 0.99) for the EMA to move")
    evaluate: bool = opt(True, "also evaluate the EMA weights (the best of both is reported)")


@dataclass
class MixupConfig:
    mixup_alpha: float = opt(0.0, "> 0 enables mixup (paper: 0.8)")
    cutmix_alpha: float = opt(0.0, "> 0 enables cutmix (paper: 1.0)")
    prob: float = opt(1.0, "probability of mixing a batch")
    switch_prob: float = opt(0.5, "with both enabled: probability of cutmix instead of mixup")


@dataclass
class FinetuneConfig(RunConfig):
    model: ClassifierModelConfig = opt(ClassifierModelConfig(), "")
    data: DataConfig = opt(MISSING, "")
    pretrained: Optional[str] = opt(None, "encoder weights (our checkpoint, an import, or any format import "
                                          "reads); null: random init")
    pretrained_format: InitFormat = opt("auto", "layout of pretrained: auto (from the key names) or a format")
    layer_decay: float = opt(0.9, "lr scale = layer_decay ** (13 - layer id), head 1 (ConvNeXt V2 recipe)")
    label_smoothing: float = opt(0.2, "label smoothing (paper: 0.2)")
    ema: EmaConfig = opt(EmaConfig(), "")
    mixup: MixupConfig = opt(MixupConfig(), "")
    eval_every_epochs: int = opt(1, "evaluation cadence; also evaluated at the end")
    epochs: int = opt(100, "length of the lr schedule and of the run")
    batch_size: int = opt(32, "per process; effective batch = batch_size * processes * accum_iter")
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
    batch_size: int = opt(64, "images per forward")
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    out: Optional[str] = opt(None, "folder for confusion_matrix.png and eval.json; null: beside the checkpoint")


@dataclass
class OnnxConfig:
    opset: int = opt(17, "ONNX opset")
    image_size: int = opt(224, "example input for tracing; batch is dynamic, H and W fixed")


@dataclass
class ExportConfig:
    ckpt: str = opt(MISSING, "our checkpoint (pretrain step-*.pt, an import, a fine-tuned checkpoint)")
    format: ExportFormat = opt("sparse_mae", "sparse_mae | timm | official_dense | official_fcmae | onnx")
    out: str = opt(MISSING, ".safetensors (default layout) or .pt; .onnx for onnx")
    variant: Optional[Variant] = opt(None, "null: detected from the shapes; else it must match")
    head: bool = opt(False, "encoder-only sources: add a fresh head (needs num_classes)")
    num_classes: Optional[int] = opt(None, "classes of the fresh head")
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
class BenchConfig:
    """Every backend x variant x mask ratio x batch size x dtype is one configuration (one row)."""

    backends: Any = opt("all", "all registered backends, or a list; those not installed are listed as skipped")
    variants: list[Variant] = opt(["atto"], "encoder variants")
    mask_ratios: list[float] = opt([0.6], "fractions of patches removed")
    batch_sizes: list[int] = opt([8], "images per step")
    dtypes: list[DType] = opt(["float32"], "bfloat16 / float16 run under autocast, where the backend supports it")
    image_size: int = opt(224, "square images of this side, a multiple of 32")
    warmup: int = opt(2, "untimed calls before the timed ones")
    repeats: int = opt(5, "timed calls; median and IQR are reported")
    device: Device = opt("auto", "auto: CUDA if visible, else CPU")
    threads: Optional[int] = opt(None, "torch intra-op threads; null: torch's default (all cores)")
    isolate: bool = opt(True, "a fresh process per configuration: clean memory numbers, a crash stays local")
    memory_guard_gib: Optional[float] = opt(None, "most memory one configuration may add; over it: recorded as oom")
    peak_tflops: Optional[float] = opt(None, "the card's peak for MFU; null: known GPUs, else the measured matmul peak")
    measure_peak: bool = opt(True, "time this machine's matmul peak per dtype before and after the grid")
    peak_size: int = opt(2048, "that matmul is peak_size^3")
    fused_adamw: bool = opt(True, "the step's AdamW as torch's fused kernel (CPU and CUDA), for every backend")
    gomp_spincount: Optional[int] = opt(2000, "isolated workers' GOMP_SPINCOUNT: spins of torch's OpenMP threads "
                                              "before they sleep (libgomp's 300000 fights other processes on a "
                                              "shared CPU; 0 = passive); null: inherit")
    timeout_s: float = opt(1800.0, "per configuration (isolated runs), seconds > 0")
    plots: bool = opt(True, "PNG plots beside the tables")
    seed: int = opt(0, "weights, images and masks")
    output_dir: str = opt("outputs/bench/${now:%Y-%m-%d_%H-%M-%S}", "results.csv / .json / .md and plots")


def check_timeout_s(value: float) -> str | None:
    """BenchConfig.timeout_s's range (for the schema's per-field checks): -> the problem, or None.
    A timeout <= 0 was accepted and then killed every isolated configuration at once."""
    return None if value > 0 else f"timeout_s must be > 0 seconds, got {value!r} (default 1800)"


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


def check_pretrain_size(size: int, mask_ratio: float) -> str | None:
    """PretrainConfig: the image must have a patch to mask and one to keep (at data.size=32 the
    one patch was kept, nothing was masked, and the loss over no patches was NaN)."""
    patches = (size // 32) ** 2
    kept = max(1, int(patches * (1 - mask_ratio)))
    if kept < patches:
        return None
    return (f"data.size={size} gives {patches} patch(es) of 32x32 and mask_ratio={mask_ratio} keeps all of them, so "
            f"there is nothing to reconstruct; use data.size >= 64 or a higher mask_ratio")


SCHEMAS: dict[str, type] = {
    "pretrain": PretrainConfig, "finetune": FinetuneConfig, "eval": EvalConfig,
    "export": ExportConfig, "import": ImportConfig, "bench": BenchConfig,
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


register()


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
