"""Checkpoint conversion between our layout and timm / official ConvNeXt V2 / SparK layouts.

    read_state_dict(path)                 -> (state dict, metadata); any of our or foreign files
    export_state_dict(sd, fmt, ...)       our FCMAE or classifier state dict -> `fmt` layout
    import_state_dict(sd, fmt, ...)       `fmt` layout -> our state dict
    conversion_check(...)                 converted dense model == sparse encoder at visible sites

All functions are pure (no files) except read_state_dict / write_state_dict.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from sparse_mae.convert.layouts import (
    FORMATS,
    PRETRAINING_FORMATS,
    SPARK_UNUSED_BUFFERS,
    CheckpointMismatchError,
    Spec,
    check_layout,
    expected_shapes,
    from_format,
    infer_spec,
    to_format,
)
from sparse_mae.io import atomic_write_bytes
from sparse_mae.models.convnextv2 import PATCH, VARIANTS, ClassifierHead, build_convnextv2
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS
from sparse_mae.models.resnet import build_resnet

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")


# -- files -------------------------------------------------------------------------------

def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a state dict from .safetensors or a torch file (weights_only: nothing unpickled).

    Torch files may be plain state dicts or wrapped under 'model' / 'state_dict' (ours,
    the official code's and timm's trainers all wrap). Returns (state dict, metadata).
    """
    from sparse_mae.train.checkpoint import guard_checkpoint_file

    path = guard_checkpoint_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
            return sd, {k: _maybe_json(v) for k, v in meta.items()}
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt / not a checkpoint: say so, keep the cause
        raise ValueError(f"could not read checkpoint {path}: the file is truncated, corrupt or not a "
                         f"torch/safetensors checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    meta = {}
    for key in WRAPPER_KEYS:
        if isinstance(obj.get(key), dict):
            meta = {k: v for k, v in obj.items() if k != key and not isinstance(v, dict | torch.Tensor)}
            meta.update(obj.get("metadata") or {})
            obj = obj[key]
            break
    if isinstance(obj.get("config"), dict) and any(k.startswith("sparse_encoder.") for k in obj):
        # SparK's state_dict(with_config=True) puts its model settings beside the tensors
        meta["spark_config"] = obj["config"]
        obj = {k: v for k, v in obj.items() if k != "config"}
    odd = [k for k in obj if not isinstance(k, str)]
    if odd:
        raise ValueError(f"checkpoint {path}: key {odd[0]!r} is not a string (type {type(odd[0]).__name__}); "
                         f"expected a state dict of parameter names")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}  # DDP-wrapped saves
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"checkpoint {path}: entries {bad[:5]} are not tensors; expected a state dict "
                         f"(plain, or under one of {WRAPPER_KEYS})")
    return sd, meta


def _maybe_json(v: str):
    try:
        return json.loads(v)
    except (json.JSONDecodeError, TypeError):
        return v


def write_state_dict(sd: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict,
                     wrapper: str = "model") -> Path:
    """.safetensors (metadata as JSON strings) or .pt ({wrapper: sd, 'metadata': ...}; SparK's
    own code reads its model under 'module'). Written to a temp file and renamed, so a crash
    never leaves a half-written export."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(sd, metadata={k: json.dumps(v) for k, v in metadata.items()})
        atomic_write_bytes(path, lambda f: f.write(data))
    elif path.suffix in (".pt", ".pth", ".bin"):
        atomic_write_bytes(path, lambda f: torch.save({wrapper: sd, "metadata": metadata}, f))
    else:
        raise ValueError(f"output {path}: use a .safetensors (default) or .pt file name")
    return path


# -- conversion --------------------------------------------------------------------------

def inspect_state_dict(sd: dict, fmt: str, variant: str | None = None, strict: bool = True,
                       source: str = "checkpoint") -> Spec:
    """Detect the variant (or use `variant`) and check every key and shape; -> the Spec."""
    spec, looks_like = infer_spec(sd, fmt, variant, source)
    check_layout(sd, spec, fmt, looks_like, strict=strict, source=source)
    return spec


def encoder_part(sd: dict, spec: Spec) -> tuple[dict, Spec]:
    """Our FCMAE / SparK or classifier state dict -> the dense classifier's (encoder; head if present)."""
    if spec.kind == "classifier":
        return dict(sd), spec
    enc = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    return enc, Spec(spec.variant, "classifier", 0, spec.in_chans)


def fresh_head(variant: str, num_classes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A new classifier head as the model initialises it: ConvNeXt's (LayerNorm ones/zeros,
    fc trunc-normal std 0.02) or ResNet's `fc` (torch's Linear init, as timm's)."""
    from sparse_mae.models.convnextv2 import init_weights

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if variant in RESNET_VARIANTS:
            spec = RESNET_VARIANTS[variant]
            fc = torch.nn.Linear(spec.widths[-1] * spec.block.expansion, num_classes)
            return {f"fc.{k}": v.detach().clone() for k, v in fc.state_dict().items()}
        head = ClassifierHead(VARIANTS[variant].dims[-1], num_classes)
        head.apply(init_weights)
    return {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}


def spark_unused_buffers(in_chans: int, input_size: int) -> dict[str, torch.Tensor]:
    """The buffers SparK's model registers but never reads (it marks them deprecated); its
    strict load wants them, so an export writes zeros of their shapes."""
    shapes = {"imn_m": (1, in_chans, 1, 1), "imn_s": (1, in_chans, 1, 1),
              "norm_black": (1, in_chans, input_size, input_size)}
    assert tuple(shapes) == SPARK_UNUSED_BUFFERS
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


def export_state_dict(sd: dict, fmt: str, variant: str | None = None, head: bool = False,
                      num_classes: int | None = None, strict: bool = True,
                      input_size: int = 224) -> tuple[dict, Spec]:
    """Our state dict (FCMAE / SparK or dense classifier) -> `fmt`. Returns (exported dict, its Spec).

    timm / official_dense / sparse_mae hold the dense classifier: a pretraining source gives
    the encoder only, unless head=True with num_classes (a freshly initialised head).
    official_fcmae needs an FCMAE source and spark a SparK one (they hold the decoder too);
    spark also gets SparK's unused buffers, sized for `input_size`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    spec = inspect_state_dict(sd, "sparse_mae", variant, strict=strict)
    sd = {k: sd[k] for k in expected_shapes(spec, "sparse_mae")}  # drops ignored extras
    if fmt in PRETRAINING_FORMATS:
        if spec.kind == "classifier":
            model = "a SparK" if fmt == "spark" else "an FCMAE"
            raise ValueError(f"format {fmt} needs {model} checkpoint (encoder + decoder); this one is a dense "
                             f"classifier: export it as timm or sparse_mae")
        out = to_format(sd, fmt, spec)
        if fmt == "spark":
            out.update(spark_unused_buffers(spec.in_chans, input_size))
        return out, spec
    sd, spec = encoder_part(sd, spec)
    if head:
        if spec.num_classes:
            if num_classes not in (None, spec.num_classes):
                raise ValueError(f"checkpoint has a {spec.num_classes}-class head; num_classes={num_classes} "
                                 f"differs (leave num_classes out to keep the trained head)")
        else:
            if not num_classes or num_classes < 1:
                raise ValueError("head=true on an encoder-only checkpoint needs num_classes=N (a fresh head)")
            sd.update(fresh_head(spec.variant, num_classes))
            spec = Spec(spec.variant, "classifier", num_classes, spec.in_chans)
    elif spec.num_classes and num_classes is not None and num_classes != spec.num_classes:
        raise ValueError(f"checkpoint has a {spec.num_classes}-class head, not {num_classes}")
    return to_format(sd, fmt, spec), spec


def import_state_dict(sd: dict, fmt: str, variant: str | None = None, strict: bool = True) -> tuple[dict, Spec]:
    """`fmt` state dict -> ours (FCMAE for official_fcmae, SparK for spark, dense classifier otherwise)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")
    if fmt == "spark":  # never read by SparK either; their shape depends on its input size
        sd = {k: v for k, v in sd.items() if k not in SPARK_UNUSED_BUFFERS}
    spec = inspect_state_dict(sd, fmt, variant, strict=strict, source=f"{fmt} checkpoint")
    return from_format(sd, fmt, spec), spec


def build_from_state_dict(sd: dict, spec: Spec, backend: str = "dense_masked") -> torch.nn.Module:
    """Our state dict + its Spec -> the model (classifier or FCMAE), loaded strictly."""
    from sparse_mae.build import create_model

    if spec.kind == "classifier":
        build = build_resnet if spec.resnet else build_convnextv2
        model = build(spec.variant, num_classes=spec.num_classes, in_chans=spec.in_chans)
    elif spec.kind == "spark":
        model = create_model(f"spark_{spec.variant}", in_chans=spec.in_chans, backend=backend,
                             decoder_dim=spec.decoder_dim)
    else:
        model = create_model(f"fcmae_convnextv2_{spec.variant}", in_chans=spec.in_chans, backend=backend,
                             decoder_dim=spec.decoder_dim, decoder_depth=spec.decoder_depth)
    model.load_state_dict(sd, strict=True)
    return model.eval()


@torch.no_grad()
def conversion_check(source_sd: dict, source_spec: Spec, exported: dict, fmt: str, exported_spec: Spec,
                     backends: list[str] | None = None, size: int = 96, seed: int = 0) -> dict[str, float]:
    """{backend: {max_abs, relative}}: |difference| at visible sites between the sparse encoder of the source weights
    (each backend) and the dense classifier rebuilt from the *exported* tensors, run on a
    masked image with the mask re-applied as the dense_masked reference does.

    Rebuilding goes through the inverse conversion, so a wrong transform in either
    direction shows up as a large difference. ResNets compare the last stage of
    `encode_stages` (eval mode: the running statistics), on the backends that run ResNets.
    """
    from sparse_mae.backends import available_backends, get_backend
    from sparse_mae.models.fcmae import random_mask

    if fmt in PRETRAINING_FORMATS:
        dense_sd, dense_spec = encoder_part(*import_state_dict(exported, fmt, exported_spec.variant))
    else:
        dense_sd, dense_spec = import_state_dict(exported, fmt, exported_spec.variant)
    converted = build_from_state_dict(dense_sd, dense_spec)
    src_sd, src_spec = encoder_part(source_sd, source_spec)
    source = build_from_state_dict(src_sd, src_spec)

    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(2, source_spec.in_chans, size, size, generator=g)
    grid = size // PATCH
    mask = random_mask(2, grid * grid, 0.5, generator=g).reshape(2, grid, grid)

    def features(backend, model) -> torch.Tensor:
        """The last stage's features at visible sites (a ResNet's stages are all zero elsewhere)."""
        if src_spec.resnet:
            return get_backend(backend).encode_stages(model, imgs, mask)[-1]
        return get_backend(backend).encode(model, imgs, mask) * (1.0 - mask).unsqueeze(1)

    dense = features("dense_masked", converted)
    report = {}
    for name in backends or available_backends():
        try:
            sparse = features(name, source)
        except NotImplementedError:
            if backends:  # asked for by name: say it cannot
                raise
            continue  # a backend that does not run this family (it says which do)
        max_abs = float((sparse - dense).abs().max())
        report[name] = {"max_abs": max_abs, "relative": max_abs / max(float(sparse.abs().max()), 1e-12)}
    return report


__all__ = [
    "FORMATS",
    "CheckpointMismatchError",
    "fresh_head",
    "Spec",
    "build_from_state_dict",
    "conversion_check",
    "encoder_part",
    "expected_shapes",
    "export_state_dict",
    "import_state_dict",
    "inspect_state_dict",
    "read_state_dict",
    "write_state_dict",
]
