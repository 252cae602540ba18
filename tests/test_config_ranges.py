"""Every range declared on a schema field is checked when the config is composed: an
out-of-range value for any checked key fails in `compose` with a message naming the key,
the allowed range and the value; the defaults pass."""
from __future__ import annotations

import re
from dataclasses import fields, is_dataclass

import pytest
from omegaconf import DictConfig, OmegaConf

from sparse_mae.apps.app import compose
from sparse_mae.config import SCHEMAS, NonEmpty, OneOf, Range, Registered, SizePairs, StopSignalNames
from sparse_mae.errors import ConfigError

# each app with every option of its data group (the data options carry different fields)
COMPOSITIONS = [("pretrain", []), ("pretrain", ["data=imagefolder"]), ("pretrain", ["data=shards"]), ("finetune", []),
                ("pretrain", ["data=fashion_mnist"]), ("finetune", ["finetune/data@data=imagefolder"]),
                ("finetune", ["finetune/data@data=shards"]), ("finetune", ["finetune/data@data=fashion_mnist"]),
                ("eval", []), ("export", []), ("import", []), ("bench", []), ("prepare", []), ("probe", [])]


def checked_keys(cfg: DictConfig, prefix: str = ""):
    """(dotted key, check) of every field of the composed config that declares a range."""
    schema = OmegaConf.get_type(cfg)
    checks = {f.name: f.metadata.get("check") for f in fields(schema)} if is_dataclass(schema) else {}
    for key in cfg:
        child = cfg._get_node(key)
        if isinstance(child, DictConfig):
            yield from checked_keys(child, f"{prefix}{key}.")
        elif checks.get(key) is not None:
            yield f"{prefix}{key}", checks[key]


def out_of_range(check, default) -> list[str]:
    """Values (as typed on the command line) that the check must refuse."""
    if isinstance(check, OneOf):
        return ["nosuch"]
    if isinstance(check, NonEmpty):
        return ["[]"]
    if isinstance(check, Registered):
        return ["[nosuch]"]
    if isinstance(check, SizePairs):
        return ["[[500,0]]", "[[500]]", "[]"]
    if isinstance(check, StopSignalNames):
        return ["[CHLD]", "[TERM,KILL]", "[NOSUCH]"]
    assert isinstance(check, Range)
    bad = []
    if check.low is not None:
        bad.append(check.low if check.low_open else check.low - 1)
    if check.high is not None:
        bad.append(check.high if check.high_open else check.high + 1)
    if check.multiple_of:
        bad.append(check.low + 1)
    is_list = isinstance(default, list)
    values = [f"[{v}]" if is_list and not check.length else str(v) for v in bad]
    if is_list and check.length:
        values = ["[" + ",".join(str(v) for v in [b] * check.length) + "]" for b in bad]
        values.append("[" + ",".join(["0.5"] * (check.length + 1)) + "]")
    if check.ascending:
        values.append("[0.9,0.5]")
    if check.nonempty:
        values.append("[]")
    return values


CASES = []
for app, extra in COMPOSITIONS:
    for key, check in checked_keys(compose(app, extra)):
        default = OmegaConf.select(compose(app, extra), key)
        default = OmegaConf.to_container(default) if OmegaConf.is_list(default) else default
        for value in out_of_range(check, default):
            CASES.append(pytest.param(app, extra, key, value, id=f"{app}{'+' + extra[0] if extra else ''}:{key}={value}"))


def test_every_schema_declares_ranges_and_the_defaults_pass():
    assert len(CASES) > 60
    assert {app for app, _ in COMPOSITIONS} == set(SCHEMAS)
    for app, extra in COMPOSITIONS:
        compose(app, extra)  # would raise ConfigError on a default out of its own range


@pytest.mark.parametrize("app, extra, key, value", CASES)
def test_an_out_of_range_value_fails_at_composition_naming_the_key(app, extra, key, value):
    with pytest.raises(ConfigError, match=rf"^invalid config: {re.escape(key)} must be .*, got "):
        compose(app, [*extra, f"{key}={value}"])


@pytest.mark.parametrize("override, message", [
    ("mask_ratio=1.0", "mask_ratio must be in (0, 1) (the paper uses 0.6), got 1.0"),
    ("data.size=100", "data.size must be >= 32 and a multiple of 32 (the patch size), got 100"),
    ("data.scale=[0.5,0.2]", "data.scale must be a list of 2 numbers, each in (0, 1], in ascending order (min, max)"),
    ("optim.betas=[0.9]", "optim.betas must be a list of 2 numbers, each in [0, 1)"),
    ("amp=maybe", "amp must be one of auto, true, false, got maybe"),
])
def test_messages_name_the_key_the_range_and_the_value(override, message):
    with pytest.raises(ConfigError) as error:
        compose("pretrain", [override])
    assert message in str(error.value)


def test_null_passes_where_the_type_allows_it():
    cfg = compose("pretrain", ["clip_grad=null", "optim.lr=null", "max_steps=null"])
    assert cfg.clip_grad is None and cfg.optim.lr is None


def test_the_command_line_reports_a_range_as_bad_input(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sparse_mae.cli", "pretrain", "mask_ratio=1.5",
                           f"output_dir={tmp_path / 'run'}", "logger=none"], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "invalid config: mask_ratio must be in (0, 1)" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_values_set_by_hand_after_composition_are_checked_by_the_engine(tmp_path):
    from sparse_mae.apps.pretrain import run_pretrain

    cfg = compose("pretrain", ["model=debug", "logger=none", f"output_dir={tmp_path / 'run'}"])
    cfg.batch_size = 0
    with pytest.raises(ConfigError, match="batch_size must be > 0"):
        run_pretrain(cfg)
