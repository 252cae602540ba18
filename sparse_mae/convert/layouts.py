"""Checkpoint layouts: our canonical names <-> timm, official dense, official FCMAE, SparK.

Every conversion is a list of rules (canonical key, foreign key, tensor transform) built
from the canonical shapes of a meta-device model, so the same table drives export,
import, shape validation and variant detection. Layout facts: docs/design.md sections 4-5.

Checkpoints may come from outside: `infer_spec` first checks key count, key types, the
stage / block / decoder indices inside key names and the sizes read off the stem, head and
decoder projection (`check_untrusted_keys`, the MAX_* bounds), so no layout is built from
an absurd number; `check_layout` then refuses tensors whose elements overlap in memory.

Kinds: "classifier" (our dense ConvNeXtV2: `stem.*`, `stages.*`, optional `head.*`; or our
dense ResNet: `conv1.*`, `bn1.*`, `layer{i}.*`, optional `fc.*`), "fcmae" (our FCMAE:
`encoder.*`, `proj.*`, `mask_token`, `decoder.{j}.*`, `pred.*`) and "spark" (our SparK:
`encoder.*` a ResNet, `densify_*`, `mask_tokens.*`, `decoder.*`). The variant names the
family: ConvNeXt V2's ("atto"...) and ResNet's ("resnet50"...) are disjoint.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import torch

from sparse_mae.backends.minkowski import depthwise_from_me, depthwise_to_me, strided_from_me, strided_to_me
from sparse_mae.models.convnextv2 import VARIANTS, build_convnextv2
from sparse_mae.models.geometry import NUM_STAGES
from sparse_mae.models.resnet import VARIANTS as RESNET_VARIANTS
from sparse_mae.models.resnet import build_resnet

FORMATS = ("sparse_mae", "timm", "official_dense", "official_fcmae", "spark")
CONVNEXT_ONLY_FORMATS = ("official_dense", "official_fcmae")  # the ConvNeXt V2 authors' code
RESNET_ONLY_FORMATS = ("spark",)  # SparK's pretraining checkpoint (keyu-tian/SparK)
PRETRAINING_FORMATS = ("official_fcmae", "spark")  # hold the decoder too
# SparK's own model adds a prefix to each part (docs/design.md section 7): ours -> theirs
SPARK_PREFIXES = (("encoder.", "sparse_encoder.sp_cnn."), ("decoder.", "dense_decoder."))
# buffers SparK's model registers and marks deprecated (never read); shapes with the input size S
SPARK_UNUSED_BUFFERS = ("imn_m", "imn_s", "norm_black")


def is_resnet(variant: str) -> bool:
    return variant in RESNET_VARIANTS


def family_variants(resnet: bool) -> dict:
    return RESNET_VARIANTS if resnet else VARIANTS
# timm builds these variants with 1x1-conv MLPs (conv_mlp=True); tiny and larger use Linear.
TIMM_CONV_MLP = frozenset({"atto", "femto", "pico", "nano"})


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the expected layout; the message lists every problem."""


# -- tensor transforms: name -> (canonical -> foreign, foreign -> canonical) ---------------

TRANSFORMS = {
    "same": (lambda t: t, lambda t: t),
    "grn4d": (lambda t: t.reshape(1, 1, 1, -1), lambda t: t.reshape(-1)),  # official GRN (1,1,1,C)
    "row": (lambda t: t.reshape(1, -1), lambda t: t.reshape(-1)),  # ME bias / sparse GRN (1,C)
    "conv1x1": (lambda t: t.reshape(*t.shape, 1, 1), lambda t: t.flatten(1)),  # timm conv MLP
    "me_dw": (depthwise_to_me, depthwise_from_me),  # MinkowskiEngine's kernels (the minkowski backend's)
    "me_down": (strided_to_me, strided_from_me),
}


# -- name mapping ------------------------------------------------------------------------

_STEM = re.compile(r"^stem\.([01])\.(\w+)$")
_DOWN = re.compile(r"^stages\.(\d+)\.downsample\.([01])\.(\w+)$")
_BLOCK = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_HEAD = re.compile(r"^head\.(norm|fc)\.(\w+)$")
_DEC = re.compile(r"^decoder\.(\d+)\.(.+)$")

# inside a block: canonical sub-name -> (official dense name, official sparse name, sparse transform)
_OFFICIAL_BLOCK = {
    "conv_dw.weight": ("dwconv.weight", "dwconv.kernel", "me_dw"),
    "conv_dw.bias": ("dwconv.bias", "dwconv.bias", "row"),
    "norm.weight": ("norm.weight", "norm.ln.weight", "same"),
    "norm.bias": ("norm.bias", "norm.ln.bias", "same"),
    "mlp.fc1.weight": ("pwconv1.weight", "pwconv1.linear.weight", "same"),
    "mlp.fc1.bias": ("pwconv1.bias", "pwconv1.linear.bias", "same"),
    "mlp.grn.weight": ("grn.gamma", "grn.gamma", "row"),
    "mlp.grn.bias": ("grn.beta", "grn.beta", "row"),
    "mlp.fc2.weight": ("pwconv2.weight", "pwconv2.linear.weight", "same"),
    "mlp.fc2.bias": ("pwconv2.bias", "pwconv2.linear.bias", "same"),
}


def _official_block(sub: str, sparse: bool) -> tuple[str, str]:
    dense_name, sparse_name, sparse_tf = _OFFICIAL_BLOCK[sub]
    if sparse:
        return sparse_name, sparse_tf
    return dense_name, "grn4d" if sub.startswith("mlp.grn.") else "same"


def _encoder_rule(ckey: str, fmt: str, variant: str) -> tuple[str, str]:
    """Canonical encoder/classifier key (no `encoder.` prefix) -> (foreign key, transform)."""
    if fmt == "sparse_mae":
        return ckey, "same"
    if fmt == "timm":
        if variant in TIMM_CONV_MLP and re.search(r"\.mlp\.fc[12]\.weight$", ckey):
            return ckey, "conv1x1"
        return ckey, "same"
    sparse = fmt == "official_fcmae"
    if m := _STEM.match(ckey):  # the official stem is dense in both models, no `ln.`
        return f"downsample_layers.0.{m[1]}.{m[2]}", "same"
    if m := _DOWN.match(ckey):
        i, part, leaf = m.groups()
        if not sparse:
            return f"downsample_layers.{i}.{part}.{leaf}", "same"
        if part == "0":
            return f"downsample_layers.{i}.0.ln.{leaf}", "same"
        return (f"downsample_layers.{i}.1.kernel", "me_down") if leaf == "weight" else (
            f"downsample_layers.{i}.1.bias", "row")
    if m := _BLOCK.match(ckey):
        name, tf = _official_block(m[3], sparse)
        return f"stages.{m[1]}.{m[2]}.{name}", tf
    if m := _HEAD.match(ckey):
        return (f"norm.{m[2]}" if m[1] == "norm" else f"head.{m[2]}"), "same"
    raise KeyError(ckey)


def _resnet_rule(ckey: str, fmt: str, kind: str) -> tuple[str, str]:
    """Our ResNet / SparK key -> (foreign key, transform). Our ResNet is timm's layout by
    construction (models/resnet.py) and our SparK names its parts as SparK does, so every
    ResNet rule is a rename of a prefix at most."""
    if kind == "classifier":
        if fmt == "spark":
            raise ValueError("format spark holds SparK's pretraining model (encoder + decoder); a dense ResNet "
                             "exports as timm (SparK's own *_timm_style.pth files are that layout)")
        return ckey, "same"
    if fmt == "timm":
        raise ValueError("format timm holds a dense classifier, not a SparK model")
    if fmt == "spark":
        for ours, theirs in SPARK_PREFIXES:
            if ckey.startswith(ours):
                return theirs + ckey.removeprefix(ours), "same"
    return ckey, "same"  # densify_norms.*, densify_projs.*, mask_tokens.*


def foreign_rule(ckey: str, fmt: str, variant: str, kind: str) -> tuple[str, str]:
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if is_resnet(variant):
        if fmt in CONVNEXT_ONLY_FORMATS:
            raise ValueError(f"format {fmt} is the ConvNeXt V2 authors' layout; a ResNet exports as "
                             f"timm, spark or sparse_mae")
        return _resnet_rule(ckey, fmt, kind)
    if fmt in RESNET_ONLY_FORMATS:
        raise ValueError(f"format {fmt} is SparK's ResNet layout; a ConvNeXt V2 exports as "
                         f"{', '.join(f for f in FORMATS if f not in RESNET_ONLY_FORMATS)}")
    if kind == "classifier":
        return _encoder_rule(ckey, fmt, variant)
    if fmt != "official_fcmae" and fmt != "sparse_mae":
        raise ValueError(f"format {fmt!r} holds a classifier, not an FCMAE model")
    if ckey.startswith("encoder."):
        name, tf = _encoder_rule(ckey.removeprefix("encoder."), fmt, variant)
        return "encoder." + name, tf
    if fmt == "official_fcmae" and (m := _DEC.match(ckey)):  # the decoder block is dense
        name, tf = _official_block(m[2], sparse=False)
        return f"decoder.{m[1]}.{name}", tf
    return ckey, "same"  # proj.*, mask_token, pred.*


# -- layouts -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """Everything the key set and shapes depend on."""

    variant: str
    kind: str  # classifier | fcmae | spark
    num_classes: int = 0  # classifier only; 0 = no head
    in_chans: int = 3
    decoder_dim: int = 512  # fcmae only
    decoder_depth: int = 1

    @property
    def resnet(self) -> bool:
        return is_resnet(self.variant)

    def describe(self) -> str:
        if self.kind == "spark":
            return f"spark_{self.variant} (decoder width {self.decoder_dim})"
        if self.resnet:
            return f"{self.variant} ({f'{self.num_classes}-class head' if self.num_classes else 'no head'})"
        if self.kind == "fcmae":
            return f"fcmae_convnextv2_{self.variant} (decoder {self.decoder_depth}x{self.decoder_dim})"
        head = f"{self.num_classes}-class head" if self.num_classes else "no head"
        return f"convnextv2_{self.variant} ({head})"


@dataclass(frozen=True)
class Rule:
    canonical: str
    foreign: str
    transform: str
    canonical_shape: tuple[int, ...]
    foreign_shape: tuple[int, ...]


@lru_cache(maxsize=256)  # bounded: every distinct spec a caller asks about stays cached
def canonical_shapes(spec: Spec) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our model for `spec`, built on the meta device (fast at any size)."""
    from sparse_mae.build import create_model

    with torch.device("meta"):
        if spec.kind == "classifier":
            build = build_resnet if spec.resnet else build_convnextv2
            model = build(spec.variant, num_classes=spec.num_classes, in_chans=spec.in_chans)
        elif spec.kind == "spark":
            model = create_model(f"spark_{spec.variant}", in_chans=spec.in_chans, decoder_dim=spec.decoder_dim)
        else:  # the shapes are the same on every backend
            model = create_model(f"fcmae_convnextv2_{spec.variant}", in_chans=spec.in_chans,
                                 decoder_dim=spec.decoder_dim, decoder_depth=spec.decoder_depth)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@lru_cache(maxsize=256)
def layout(spec: Spec, fmt: str) -> tuple[Rule, ...]:
    rules = []
    for ckey, shape in canonical_shapes(spec).items():
        fkey, tf = foreign_rule(ckey, fmt, spec.variant, spec.kind)
        fshape = tuple(TRANSFORMS[tf][0](torch.empty(shape, device="meta")).shape)
        rules.append(Rule(ckey, fkey, tf, shape, fshape))
    return tuple(rules)


def foreign_only(spec: Spec, fmt: str) -> dict[str, tuple[tuple[int, ...], float]]:
    """Keys a foreign layout holds that our model has no place for: key -> (shape, the value
    an export fills it with). An import drops them and accepts a file without them.

    timm's ConvNeXt keeps its head's LayerNorm when built without a classifier (num_classes=0
    makes only `head.fc` an Identity), so its strict load of an encoder wants `head.norm.*`;
    our encoder has no head. The export writes LayerNorm's initial values, which timm's
    model starts from too; forward_features never reads them.
    """
    if fmt == "timm" and spec.kind == "classifier" and not spec.resnet and spec.num_classes == 0:
        dim = (VARIANTS[spec.variant].dims[-1],)
        return {"head.norm.weight": (dim, 1.0), "head.norm.bias": (dim, 0.0)}
    return {}


def expected_shapes(spec: Spec, fmt: str) -> dict[str, tuple[int, ...]]:
    return {**{r.foreign: r.foreign_shape for r in layout(spec, fmt)},
            **{k: shape for k, (shape, _) in foreign_only(spec, fmt).items()}}


# -- detection and validation ------------------------------------------------------------

# Checkpoints may come from anywhere, and the layout for a spec is built (on the meta
# device) before shapes can be compared, so the numbers a spec is made of are checked
# first: key count, key names' stage / block / decoder indices, and the sizes read off
# the stem, head and decoder projection. The limits come from the variant table, or are
# generous multiples of anything the paper or a plausible fine-tune uses.
MAX_STAGE_DEPTHS = tuple(max(v.depths[i] for v in VARIANTS.values()) for i in range(NUM_STAGES))  # (3, 3, 27, 3)
MAX_DECODER_DEPTH = 32  # the paper's FCMAE decoder is 1 block
MAX_DECODER_DIM = 4096  # the paper's is 512
MAX_IN_CHANS = 64  # RGB is 3; multispectral inputs a few dozen
MAX_NUM_CLASSES = 100_000  # ImageNet-22K has 21841
MAX_KEYS = 10_000  # the largest layout (huge FCMAE, 32 decoder blocks) has 701
MAX_INDEX = 1_000  # any other number inside a key (stem.0, downsample.1, ...)


def _short(key: object, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else f"{text[:limit]}...' ({len(text)} characters)"


def _digits(number: str) -> str:
    return number if len(number) <= 24 else f"{number[:24]}... ({len(number)} digits)"


def _index_error(source: str, key: str, what: str, bound: str) -> CheckpointMismatchError:
    return CheckpointMismatchError(
        f"{source} key {_short(key)}: {what} is out of range ({bound}); this is not a ConvNeXt V2 / FCMAE "
        f"checkpoint of a known variant, or it was altered")


def _is_number(part: str) -> bool:
    return part.isascii() and part.isdigit()  # str.isdigit alone accepts "²", which int() refuses


def _check_key_indices(key: str, source: str) -> None:
    """Every number inside `key` is within the bounds of the known layouts (all formats)."""
    parts = key.removeprefix("encoder.").split(".")
    in_encoder = key.startswith("encoder.")
    for pos, part in enumerate(parts):
        if not _is_number(part):
            continue
        value = int(part) if len(part) <= 9 else None  # longer is out of every range (and int() may refuse)
        parent = parts[pos - 1] if pos else ""
        if pos == 1 and parent in ("stages", "downsample_layers"):
            if value is None or value >= NUM_STAGES:
                raise _index_error(source, key, f"stage {_digits(part)}",
                                   f"ConvNeXt V2 has stages 0..{NUM_STAGES - 1}")
        elif parts[0] == "stages" and _is_number(parts[1]) and (pos == 2 or (pos == 3 and parts[2] == "blocks")):
            stage = int(parts[1])  # < NUM_STAGES: checked at pos 1
            most = MAX_STAGE_DEPTHS[stage]
            if value is None or value >= most:
                raise _index_error(source, key, f"block {_digits(part)} of stage {stage}",
                                   f"ConvNeXt V2 variants have at most {most} blocks in stage {stage}")
        elif pos == 1 and parent == "decoder" and not in_encoder:
            if value is None or value >= MAX_DECODER_DEPTH:
                raise _index_error(source, key, f"decoder block {_digits(part)}",
                                   f"at most {MAX_DECODER_DEPTH} decoder blocks are supported; the paper's FCMAE "
                                   f"has 1")
        elif value is None or value >= MAX_INDEX:
            raise _index_error(source, key, f"index {_digits(part)}",
                               f"no other number in a ConvNeXt V2 key reaches {MAX_INDEX}")


def check_untrusted_keys(sd: dict, source: str = "checkpoint") -> None:
    """Cheap checks on a state dict from outside, before anything is built from it: its size,
    that keys are strings and values tensors, and that every index in a key is in range."""
    if len(sd) > MAX_KEYS:
        raise CheckpointMismatchError(
            f"{source} has {len(sd)} entries; a ConvNeXt V2 / FCMAE state dict has at most {MAX_KEYS} "
            f"(the largest layout has 701): this is not a model state dict")
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointMismatchError(f"{source}: key {_short(key)} is not a string (type {type(key).__name__}); "
                                          f"state dict keys are parameter names")
        if not isinstance(value, torch.Tensor):
            raise CheckpointMismatchError(f"{source}: entry {_short(key)} is not a tensor (type "
                                          f"{type(value).__name__}); expected a state dict of tensors")
        if value.layout != torch.strided:  # a sparse tensor's shape says nothing about what the file holds
            raise CheckpointMismatchError(f"{source}: tensor {_short(key)} has layout {value.layout}; model "
                                          f"parameters are dense (torch.strided) tensors")
        _check_key_indices(key, source)


def _check_size(value: int, most: int, what: str, key: str, shape, source: str) -> None:
    """`what` names the number read off `key`'s shape, e.g. "{} classes"."""
    if value > most:
        raise CheckpointMismatchError(
            f"{source} key {_short(key)} has shape {shape}, i.e. {what.format(value)} (at most {most} supported); "
            f"this is not a checkpoint of a known ConvNeXt V2 variant, or it was altered")


def _check_storage(sd: dict, keys, source: str) -> None:
    """Refuse tensors whose elements overlap in memory (e.g. one value `expand`ed to a large
    shape): a tiny file could then demand any amount of memory once converted. Parameters
    saved from a model never overlap."""
    for key in keys:
        t = sd[key]
        if t.numel() and t.untyped_storage().nbytes() < t.numel() * t.element_size():
            raise CheckpointMismatchError(
                f"{source}: tensor {_short(key)} of shape {tuple(t.shape)} shares its elements (its storage holds "
                f"{t.untyped_storage().nbytes()} bytes for {t.numel()} elements); a saved parameter never does. "
                f"If this file is yours, save it with .contiguous() tensors")


def _kind_of(sd: dict, fmt: str) -> str:
    if fmt == "official_fcmae":
        return "fcmae"
    if fmt == "spark":
        return "spark"
    if fmt == "sparse_mae" and any(k.startswith("encoder.") for k in sd):
        return "spark" if "encoder.conv1.weight" in sd else "fcmae"
    return "classifier"


def _shape(sd: dict, key: str):
    t = sd.get(key)
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _looks_resnet(sd: dict, fmt: str, kind: str) -> bool:
    if kind == "spark" or fmt in RESNET_ONLY_FORMATS:
        return True
    if kind == "fcmae" or fmt in CONVNEXT_ONLY_FORMATS:
        return False
    return "conv1.weight" in sd  # ConvNeXt's stem is `stem.0`


def infer_spec(sd: dict, fmt: str, variant: str | None = None,
               source: str = "checkpoint") -> tuple[Spec, str]:
    """(the spec the dict matches best, the variant its shapes look like).

    `variant` given: the spec uses it (validation then reports any difference); the second
    value is still the best-scoring variant, so a wrong-variant error can name it.
    """
    check_untrusted_keys(sd, source)  # before any layout is built from numbers in the dict
    kind = _kind_of(sd, fmt)
    resnet = _looks_resnet(sd, fmt, kind) if variant is None else is_resnet(str(variant))
    if resnet and kind == "fcmae":
        kind = "spark"
    family = family_variants(resnet)
    any_variant = next(iter(family))
    prefix = "encoder." if kind != "classifier" else ""

    def fkey(ckey: str) -> str:
        return foreign_rule(prefix + ckey, fmt, any_variant, kind)[0]

    stem_key = fkey("conv1.weight" if resnet else "stem.0.weight")
    stem = _shape(sd, stem_key)
    in_chans = stem[1] if stem and len(stem) == 4 else 3
    _check_size(in_chans, MAX_IN_CHANS, "{} input channels", stem_key, stem, source)
    num_classes, dec_dim, dec_depth = 0, 512, 1
    if kind == "classifier":
        head_key = fkey("fc.weight" if resnet else "head.fc.weight")
        head = _shape(sd, head_key)
        num_classes = head[0] if head and len(head) == 2 else 0
        _check_size(num_classes, MAX_NUM_CLASSES, "{} classes", head_key, head, source)
    elif kind == "spark":  # the first up-sampling block runs at the decoder's full width
        up_key = foreign_rule("decoder.dec.0.up_sample.weight", fmt, any_variant, kind)[0]
        up = _shape(sd, up_key)
        dec_dim = up[0] if up and len(up) == 4 else 512
        _check_size(dec_dim, MAX_DECODER_DIM, "a decoder width of {}", up_key, up, source)
    else:
        proj = _shape(sd, "proj.weight")
        dec_dim = proj[0] if proj and len(proj) == 4 else 512
        _check_size(dec_dim, MAX_DECODER_DIM, "a decoder width of {}", "proj.weight", proj, source)
        ids = {int(m[1]) for k in sd if (m := _DEC.match(k))}  # each < MAX_DECODER_DEPTH: checked above
        dec_depth = max(ids) + 1 if ids else 1

    def score(v: str) -> int:
        spec = Spec(v, kind, num_classes, in_chans, dec_dim, dec_depth)
        exp = expected_shapes(spec, fmt)
        hits = sum(1 for k, s in exp.items() if _shape(sd, k) == s)
        return 2 * hits - len(exp)  # penalise expected keys the dict lacks

    scores = {v: score(v) for v in family}
    looks_like = max(scores, key=scores.get)
    chosen = variant or looks_like
    if chosen not in family:
        raise ValueError(f"unknown variant {chosen!r}; valid variants: {', '.join([*VARIANTS, *RESNET_VARIANTS])}")
    return Spec(chosen, kind, num_classes, in_chans, dec_dim, dec_depth), looks_like


def guess_format(sd: dict) -> str | None:
    """Which layout the key names look like (names only; shapes are checked elsewhere)."""
    keys = list(sd)
    if any(k.startswith("sparse_encoder.") for k in keys):
        return "spark"
    if "conv1.weight" in sd or "encoder.conv1.weight" in sd:
        return "sparse_mae"  # our ResNet is timm's layout: the two read the same
    if any(k.startswith("encoder.downsample_layers.") for k in keys):
        return "official_fcmae"
    if any(k.startswith("downsample_layers.") for k in keys):
        return "official_dense"
    if any(k.startswith(("stem.", "encoder.stem.")) for k in keys):
        conv_mlp = any(k.endswith("mlp.fc1.weight") and sd[k].dim() == 4 for k in keys)
        timm_encoder = "head.norm.weight" in sd and "head.fc.weight" not in sd  # foreign_only
        return "timm" if conv_mlp or timm_encoder else "sparse_mae"  # timm and ours share names otherwise
    return None


def _listing(title: str, items: list[str], limit: int = 12) -> str:
    shown = items[:limit] + ([f"... and {len(items) - limit} more"] if len(items) > limit else [])
    return f"  {title} ({len(items)}):\n" + "\n".join(f"    {s}" for s in shown)


def check_layout(sd: dict, spec: Spec, fmt: str, looks_like: str | None = None, strict: bool = True,
                 source: str = "checkpoint") -> None:
    """Raise CheckpointMismatchError listing missing / unexpected / wrong-shape keys."""
    exp = expected_shapes(spec, fmt)
    optional = foreign_only(spec, fmt)  # our exports before they were added lack them
    missing = [k for k in exp if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in exp] if strict else []
    wrong = [f"{k}: got {tuple(sd[k].shape)}, expected {exp[k]}" for k in exp
             if k in sd and tuple(sd[k].shape) != exp[k]]
    if not (missing or unexpected or wrong):
        _check_storage(sd, [k for k in exp if k in sd], source)
        return
    parts = [f"{source} does not match the {fmt} layout of {spec.describe()}:"]
    if missing:
        parts.append(_listing("missing keys", missing))
    if unexpected:
        parts.append(_listing("unexpected keys", unexpected))
    if wrong:
        parts.append(_listing("wrong shapes", wrong))
    guessed = guess_format(sd)
    if guessed and guessed != fmt and not (guessed == "sparse_mae" and fmt == "timm"):
        parts.append(f"  its key names look like format {guessed!r}: pass format={guessed}")
    elif looks_like and looks_like != spec.variant:
        parts.append(f"  its shapes look like variant {looks_like!r}: pass variant={looks_like} "
                     f"(or the checkpoint of the variant you meant)")
    elif missing and not unexpected and not wrong:
        parts.append("  the file may be truncated or saved from a partial model")
    if unexpected and not missing and not wrong:
        parts.append("  pass strict=false to ignore the unexpected keys")
    raise CheckpointMismatchError("\n".join(parts))


# -- conversion --------------------------------------------------------------------------

def to_format(sd: dict, fmt: str, spec: Spec) -> dict[str, torch.Tensor]:
    """Canonical state dict (already checked against `spec`) -> `fmt` layout."""
    out = {r.foreign: TRANSFORMS[r.transform][0](sd[r.canonical]).contiguous().clone()
           for r in layout(spec, fmt)}
    out.update({k: torch.full(shape, value) for k, (shape, value) in foreign_only(spec, fmt).items()})
    return out


def from_format(sd: dict, fmt: str, spec: Spec) -> dict[str, torch.Tensor]:
    """`fmt` state dict (already checked against `spec`) -> canonical layout."""
    return {r.canonical: TRANSFORMS[r.transform][1](sd[r.foreign]).contiguous().clone()
            for r in layout(spec, fmt)}
