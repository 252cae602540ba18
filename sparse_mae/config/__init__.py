"""Typed config schemas of every Hydra app, registered with Hydra's ConfigStore.

Every default lives in a schema, once. `conf/sparse_mae_conf/<app>.yaml` holds only the
defaults list (which group option is the default), Hydra's own settings and examples;
`conf/sparse_mae_conf/experiment/*.yaml` hold only the differences of an experiment. Because the schemas are dataclasses, Hydra
itself rejects unknown keys, wrong types and unknown choices (enums) when it composes a
config. Ranges are declared on the fields too (`opt(..., check=Range(...))`), and
`validate(cfg)` checks every declared range of a composed config: `apps.app.compose` and
the Hydra entry points call it, so an out-of-range value fails when the config is
composed, with a message naming the key and the allowed range.

Bottom to top: `checks` (the validator kit: `opt`, Range, OneOf, ...; imports nothing of
the project), `choices` (closed sets of strings), `data` (the data options), `run` (what the
training engine reads, the stop signals), `apps` (each app's schema), `registry` (Hydra's
ConfigStore), `validate` (validate and describe a composed config).
"""
from __future__ import annotations

from sparse_mae.config.apps import (
    COMPILED,
    BenchConfig,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    ImportConfig,
    PrepareConfig,
    PretrainConfig,
    ProbeConfig,
    Registered,
)
from sparse_mae.config.checks import NonEmpty, OneOf, Range, SizePairs, opt
from sparse_mae.config.data import FashionMnistImages
from sparse_mae.config.registry import SCHEMAS, register
from sparse_mae.config.run import (
    ALLOWED_STOP_SIGNALS,
    DEFAULT_STOP_SIGNALS,
    RunConfig,
    StopSignalNames,
    check_output_dir,
    parse_signals,
)
from sparse_mae.config.validate import describe, validate
from sparse_mae.errors import ConfigError

register()

__all__ = [
    "ALLOWED_STOP_SIGNALS", "COMPILED", "DEFAULT_STOP_SIGNALS", "SCHEMAS", "BenchConfig", "ConfigError",
    "EvalConfig", "ExportConfig", "FashionMnistImages", "FinetuneConfig", "ImportConfig", "NonEmpty", "OneOf",
    "PrepareConfig", "PretrainConfig", "ProbeConfig", "Range", "Registered", "RunConfig", "SizePairs",
    "StopSignalNames", "check_output_dir", "describe", "opt", "parse_signals", "register", "validate",
]
