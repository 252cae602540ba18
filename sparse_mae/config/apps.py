"""Each app's schema (pretrain, finetune, eval, probe, export, import, prepare, bench) and the
model and backend groups they choose from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from sparse_mae.backends import list_backends
from sparse_mae.config.checks import (
    MASK_RATIO,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    NonEmpty,
    OneOf,
    Choice,
    Range,
    SizePairs,
    opt,
)
from sparse_mae.config.choices import (
    BackendName, Device, DType, EncoderVariant, ExportFormat, InitFormat, LayoutFormat,
)
from sparse_mae.config.data import PATCH_MULTIPLE, DataConfig
from sparse_mae.config.run import OptimConfig, RunConfig, SchedConfig
from sparse_mae.models.geometry import PATCH, visible_count
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS
from sparse_mae.models.spark import DECODER_WIDTH_MULTIPLE

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


@dataclass
class FcmaeModelConfig:
    """The pretraining model: a ConvNeXt V2 variant pretrains with FCMAE, a ResNet (resnet18,
    resnet50, ...) with SparK."""

    variant: EncoderVariant = opt(MISSING, "encoder variant; `model=<variant>` sets it (ConvNeXt V2: FCMAE; "
                                            "resnet*: SparK)")
    decoder_dim: int = opt(512, "FCMAE: width of the decoder's ConvNeXt block; SparK: width of the first of its "
                                "five UNet blocks, a multiple of 32 (both papers: 512)", POSITIVE)
    decoder_depth: int = opt(1, "FCMAE decoder blocks (paper: 1); SparK's decoder has its fixed five", POSITIVE)
    norm_pix_loss: bool = opt(True, "loss on per-patch normalised pixels (both papers)")
    drop_path_rate: float = opt(0.0, "stochastic depth of the ConvNeXt encoder (the ResNets have none: 0)",
                                Range(0, 1, high_open=True))
    sync_bn: bool = opt(True, "SparK on several processes: SyncBatchNorm, BatchNorm statistics over the visible "
                              "sites of the global batch (SparK's default)")


def spark_problem(node) -> Optional[str]:
    """What SparK (a ResNet variant) cannot take: FCMAE-only options, a backend without ResNets."""
    model, variant = node.model, node.model.variant
    if model.decoder_depth != 1:
        return f"model={variant}: SparK's decoder has a fixed five UNet blocks; leave model.decoder_depth at 1"
    if model.drop_path_rate != 0:
        return f"model={variant}: the ResNet encoder has no stochastic depth; set model.drop_path_rate=0"
    if model.decoder_dim % DECODER_WIDTH_MULTIPLE:
        return (f"model={variant}: model.decoder_dim={model.decoder_dim} must be a multiple of {DECODER_WIDTH_MULTIPLE} "
                f"(SparK: 512)")
    if node.init is not None:
        return f"model={variant}: init= reads ConvNeXt V2 checkpoints only; start SparK runs without init"
    return None


@dataclass
class ClassifierModelConfig:
    variant: EncoderVariant = opt(MISSING, "classifier variant; must match the pretrained checkpoint")
    drop_path_rate: float = opt(0.1, "stochastic depth (paper atto fine-tuning recipe: 0.1; the ResNets have "
                                     "none: 0)",
                                Range(0, 1, high_open=True))


@dataclass
class BackendConfig:
    name: BackendName = opt(MISSING, "encoder engine; auto: native where available, else dense_masked")


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
        was kept, nothing was masked, and the loss over no patches was NaN. SparK's settings
        (model=resnet*) must be ones it has."""
        if not OmegaConf.is_missing(node.model, "variant") and str(node.model.variant) in RESNET_VARIANTS:
            if problem := spark_problem(node):
                return problem
        if OmegaConf.is_missing(node, "data") or OmegaConf.is_missing(node, "mask_ratio"):
            return None
        size, ratio = node.data.size, node.mask_ratio
        patches = (size // PATCH) ** 2
        if visible_count(patches, ratio) < patches:
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

    @staticmethod
    def relations(node) -> Optional[str]:
        """A ResNet classifier has no stochastic depth: a rate asked for would be ignored."""
        if (not OmegaConf.is_missing(node.model, "variant") and str(node.model.variant) in RESNET_VARIANTS
                and node.model.drop_path_rate != 0):
            return (f"model={node.model.variant}: the ResNet classifier has no stochastic depth; "
                    f"set model.drop_path_rate=0")
        return None


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
    variant: EncoderVariant = opt(MISSING, "encoder variant; must match ckpt")


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
    format: ExportFormat = opt("sparse_mae", "sparse_mae | timm | official_dense | official_fcmae | spark | onnx")
    out: str = opt(MISSING, ".safetensors (default layout) or .pt; .onnx for onnx")
    variant: Optional[EncoderVariant] = opt(None, "null: detected from the shapes; else it must match")
    head: bool = opt(False, "encoder-only sources: add a fresh head (needs num_classes)")
    num_classes: Optional[int] = opt(None, "classes of the fresh head", POSITIVE)
    strict: bool = opt(True, "false: ignore unexpected keys in ckpt")
    check: bool = opt(True, "check the conversion: dense converted model vs the sparse encoder")
    check_backends: Optional[list[str]] = opt(None, "backends for the check; null: all available here")
    onnx: OnnxConfig = opt(OnnxConfig(), "")


@dataclass
class ImportConfig:
    ckpt: str = opt(MISSING, "plain state dict, or wrapped under 'model' / 'state_dict'; .pt/.pth/.safetensors")
    format: LayoutFormat = opt(MISSING, "official_fcmae (gives our FCMAE model) | spark (our SparK model) | "
                                        "official_dense | timm | sparse_mae")
    out: str = opt(MISSING, "our checkpoint, a .pt file (.safetensors also accepted)")
    variant: Optional[EncoderVariant] = opt(None, "null: detected from the shapes; else it must match")
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
    variants: list[EncoderVariant] = opt(["atto"], "encoder variants (ConvNeXt V2: FCMAE; resnet*: SparK)",
                                         NonEmpty())
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
