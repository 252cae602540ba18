"""Start a model from weights in any layout `sparse-mae import` reads (init= / pretrained=).

Unlike resume, this carries no optimizer state, step or RNG: it starts a new run.
- FCMAE / SparK model from its own kind of checkpoint (ours, official_fcmae, spark): every weight.
- FCMAE model from a classifier (ours, timm, official_dense): the encoder; the decoder
  keeps its fresh init.
- Classifier from either: the encoder; the head keeps its fresh init (a new task).
"""
from __future__ import annotations

import torch

from sparse_mae.convert import encoder_part, import_state_dict, read_state_dict
from sparse_mae.convert.layouts import Spec, guess_format

HEAD_PREFIXES = ("head.", "fc.")  # the classifier heads: ConvNeXt V2's, ResNet's


def read_weights(path: str, fmt: str = "auto", variant: str | None = None,
                 option: str = "init") -> tuple[dict[str, torch.Tensor], Spec, str]:
    """Weights in any layout `import` reads -> (our state dict, its spec, the layout it was read
    as); a checkpoint of another variant than `variant` is refused naming the `option` to fix."""
    fmt = str(fmt)
    foreign, _ = read_state_dict(path)
    if fmt == "auto":  # names that fit no layout are checked against ours, which lists what differs
        fmt = guess_format(foreign) or "sparse_mae"
    sd, spec = import_state_dict(foreign, fmt, variant=None, strict=True)
    if variant is not None and spec.variant != str(variant):
        encoder = spec.variant if spec.resnet else f"convnextv2_{spec.variant}"
        raise ValueError(f"{option}={path} is a {encoder} checkpoint but model={variant}; "
                         f"pass model={spec.variant}")
    return sd, spec, fmt


def load_starting_weights(model: torch.nn.Module, path: str, fmt: str = "auto", variant: str | None = None,
                          option: str = "init") -> str:
    """Load `path` into `model` (an FCMAE or a classifier of `variant`); -> what was loaded."""
    sd, spec, fmt = read_weights(path, fmt, variant, option)
    is_fcmae_model = hasattr(model, "encoder")
    if is_fcmae_model and spec.kind != "classifier":
        model.load_state_dict(sd, strict=True)
        return f"all weights of the {fmt} {spec.kind} checkpoint {path}"
    encoder, _ = encoder_part(sd, spec)
    encoder = {k: v for k, v in encoder.items() if not k.startswith(HEAD_PREFIXES)}
    target = model.encoder if is_fcmae_model else model
    missing, unexpected = target.load_state_dict(encoder, strict=False)
    if unexpected or any(not k.startswith(HEAD_PREFIXES) for k in missing):
        raise ValueError(f"{option}={path}: missing {missing}, unexpected {unexpected}")
    fresh = "decoder" if is_fcmae_model else "head"
    return f"the encoder of the {fmt} {spec.kind} checkpoint {path} (the {fresh} starts fresh)"


__all__ = ["load_starting_weights", "read_weights"]
