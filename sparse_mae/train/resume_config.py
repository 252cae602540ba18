"""What a resumed run may change of the config its checkpoint was written with.

- MUST_MATCH: keys that define the run. A resume with another value would not continue
  that run (batch 8 -> 16 made the epoch jump and halved the schedule): refused, naming
  each key, old and new, and the way to change them (a new run from the weights).
- MAY_CHANGE: where and how the run is carried out, not what it computes: silent.
- Every other key (clip_grad, amp, backend, ema, mixup, label_smoothing, ...) changes the
  training from then on but not its meaning: allowed, with a warning listing each key,
  old and new.
- data.root: where both the checkpoint and this start know the data's identity
  (data/identity.py), the identities are compared, not the paths: the same data under
  another spelling or path continues with a note; other data is refused, naming both. A
  checkpoint without one (the built-in images, or an earlier version) compares the path
  as written.
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sparse_mae.data.identity import describe

MUST_MATCH = ("model", "seed", "batch_size", "accum_iter", "epochs", "mask_ratio", "optim", "sched",
              "data.name", "data.root", "data.size", "data.num_images", "data.num_train", "data.num_val",
              "data.draw_size", "data.seed", "data.scale", "data.hflip")
MAY_CHANGE = ("resume", "output_dir", "max_steps", "logger", "log_every_steps", "checkpoint", "device",
              "data.num_workers", "stop_signals", "nonfinite", "recon", "init", "init_format", "pretrained",
              "pretrained_format")


def _flat(node, prefix: str = "") -> dict[str, object]:
    out = {}
    if isinstance(node, dict):
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved_yaml: str | None, cfg: DictConfig,
                   skip: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """-> (refused changes, warned changes), each "key: old -> new"; keys in `skip` are left
    to the caller."""
    if not saved_yaml:
        return [], []
    old = _flat(OmegaConf.to_container(OmegaConf.create(saved_yaml), resolve=False))
    new = _flat(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    refused, warned = [], []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a == b or _under(key, MAY_CHANGE) or key in skip:
            continue
        (refused if _under(key, MUST_MATCH) else warned).append(f"{key}: {a} -> {b}")
    return refused, warned


def check_resume_config(saved_yaml: str | None, cfg: DictConfig, checkpoint, warn,
                        saved_identity: dict | None = None, identity: dict | None = None) -> None:
    """Raise ValueError (exit 2) for a refused change; `warn` the allowed ones. `identity`:
    this start's data (data/identity.py), `saved_identity`: the checkpoint's."""
    by_identity = bool(saved_identity and identity)
    refused, warned = config_changes(saved_yaml, cfg, skip=("data.root",) if by_identity else ())
    if by_identity:
        refused += data_changes(saved_identity, identity, warn)
    if refused:
        weights = "init=" if "mask_ratio" in cfg else "pretrained="
        raise ValueError(
            f"resuming {checkpoint} with a changed config: " + "; ".join(refused) + ". These keys define the run, "
            f"so it would no longer continue it; pass the run's values (its config.yaml), or start a new run from "
            f"its weights in a new output_dir ({weights}{checkpoint})")
    if warned:
        warn(f"warning: resuming {checkpoint} with changed settings (they apply from here on): " + "; ".join(warned))


def data_changes(saved: dict, now: dict, warn) -> list[str]:
    """data.root by identity: -> [the refusal] for other data; [] for the same data, with a
    note where data.root is written otherwise or names another folder."""
    if saved["digest"] != now["digest"]:
        return [f"data.root={now['as_written']} holds other data: the run read {describe(saved)}, this start "
                f"finds {describe(now)}; point data.root at the data the run read"]
    if saved["root"] != now["root"]:
        warn(f"note: the data moved from {saved['root']} to {now['root']}: the same data ({now['kind']} "
             f"{now['digest'][:12]}), so the run continues")
    elif saved.get("as_written") != now["as_written"]:
        warn(f"note: data.root={now['as_written']} is the folder the run read as data.root={saved.get('as_written')} "
             f"({now['root']}), so the run continues")
    return []
