"""A composed config checked against the checks declared on its schemas' fields (and each
schema's `relations` across its fields), and every key described with its help line."""
from __future__ import annotations

from dataclasses import fields, is_dataclass
from enum import Enum

from sparse_mae.errors import ConfigError


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
