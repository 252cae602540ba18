"""Our timm exports in real timm 1.0.31: the file loads strictly into timm's model and gives
our dense model's features (and pre-logits and logits where the export has a head) to 1e-5
relative.

timm cannot sit in the project's venv (it needs torchvision, whose build does not import beside
our CPU torch), so tools/timm_env.sh builds a side venv (.venv-timm, once; TIMM_VENV moves it)
and tools/timm_check.py, which imports torch and timm only, loads and compares there. The
weights are random throughout, BatchNorm running statistics included, so a rule that drops,
swaps or reshapes a tensor wrongly changes the numbers; the last tests break an export on
purpose and check that the timm side says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sparse_mae
from sparse_mae.convert import (
    build_from_state_dict,
    encoder_part,
    export_state_dict,
    fresh_head,
    inspect_state_dict,
    read_state_dict,
    write_state_dict,
)
from sparse_mae.models.resnet import ResNet
from tests.test_export import random_fcmae_state
from tests.test_export_resnet import random_spark_state

pytestmark = pytest.mark.slow  # the side venv takes minutes to build the first time

REPO = Path(__file__).resolve().parents[1]
TIMM_VENV = Path(os.environ.get("TIMM_VENV", REPO / ".venv-timm"))
TIMM_CHECK = REPO / "tools" / "timm_check.py"
TOLERANCE = 1e-5  # relative: the promise for timm exports
IMAGE_SIZE = 64  # small, and a multiple of the 32-pixel patch


@pytest.fixture(scope="session")
def timm_python() -> Path:
    """The side venv's python, built by tools/timm_env.sh (quick when already there)."""
    r = subprocess.run(["bash", str(REPO / "tools" / "timm_env.sh")], capture_output=True, text=True,
                       env={**os.environ, "TIMM_VENV": str(TIMM_VENV)})
    assert r.returncode == 0, f"tools/timm_env.sh failed:\n{r.stdout}\n{r.stderr}"
    return TIMM_VENV / "bin" / "python"


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("timm") / "images.pt"
    torch.save({"images": x}, path)
    return x, path


def run_timm_check(python: Path, weights: Path, model: str, num_classes: int, inputs: Path,
                   expected: Path) -> tuple[int, dict]:
    """(exit status, the JSON line) of tools/timm_check.py in the side venv; -I: no PYTHONPATH,
    so nothing of ours can be imported there."""
    r = subprocess.run([str(python), "-I", str(TIMM_CHECK), "--weights", str(weights), "--model", model,
                        "--num-classes", str(num_classes), "--inputs", str(inputs), "--expected", str(expected),
                        "--tolerance", str(TOLERANCE)], capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    assert lines, f"tools/timm_check.py printed nothing (exit {r.returncode}):\n{r.stderr}"
    return r.returncode, json.loads(lines[-1])


# -- our side: weights, exports and the outputs timm must reproduce ------------------------------

def export_with_cli(source: dict, out: Path, *options: str) -> Path:
    """`sparse-mae export format=timm` on a checkpoint as training writes it."""
    ckpt = out.with_name(out.stem + "_source.pt")
    torch.save({"model": source, "step": 3}, ckpt)
    r = subprocess.run([sys.executable, "-m", "sparse_mae.cli", "export", f"ckpt={ckpt}", "format=timm",
                        f"out={out}", "check_backends=[dense_masked]", *options],
                       capture_output=True, text=True, cwd=out.parent)
    assert r.returncode == 0, r.stderr
    return out


def export_with_function(source: dict, out: Path, **options) -> Path:
    """The function the CLI calls, written as the CLI writes it."""
    exported, spec = export_state_dict(source, "timm", **options)
    return write_state_dict(exported, out, {"variant": spec.variant})


def dense_model(source: dict, head: dict | None = None) -> torch.nn.Module:
    """Our dense classifier (or encoder) from the source weights, not from the export."""
    sd, spec = encoder_part(source, inspect_state_dict(source, "sparse_mae"))
    if head is not None:
        sd = {**sd, **head}
        spec = inspect_state_dict(sd, "sparse_mae")
    return build_from_state_dict(sd, spec)


@torch.no_grad()
def our_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What timm's forward_features / forward_head(pre_logits=True) / forward_head give, from
    our model. A ConvNeXt without a head has no pre-logits of ours (timm's head norm there is
    the export's fresh one)."""
    features = model.forward_features(x)
    pooled = features.mean(dim=(2, 3))
    out = {"features": features}
    if isinstance(model, ResNet):  # pools straight into fc
        out["pre_logits"] = pooled
    elif model.head is not None:
        out["pre_logits"] = model.head.norm(pooled)
    if model.num_classes:
        out["logits"] = model(x)
    return out


def random_classifier_head(source: dict, num_classes: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """A trained-looking head for `source`'s encoder: every tensor random (the LayerNorm too)."""
    variant = inspect_state_dict(source, "sparse_mae").variant
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in fresh_head(variant, num_classes).items()}


@dataclass(frozen=True)
class Case:
    """One export, the timm model that must load it, and how it was made."""

    name: str
    timm_model: str
    num_classes: int
    make: Callable[[Path], tuple[Path, torch.nn.Module]]  # folder -> (exported file, our dense model)


def resnet50_spark_encoder_via_cli(folder: Path):
    source = random_spark_state("resnet50")
    return export_with_cli(source, folder / "resnet50.safetensors"), dense_model(source)


def resnet18_classifier_with_head(folder: Path):
    source = random_spark_state("resnet18")
    classifier = dense_model(source, random_classifier_head(source, 10))
    return export_with_function(classifier.state_dict(), folder / "resnet18.pt"), classifier


def atto_fcmae_encoder_via_cli(folder: Path):
    source = random_fcmae_state("atto")
    return export_with_cli(source, folder / "atto.safetensors"), dense_model(source)


def atto_fcmae_with_fresh_head_via_cli(folder: Path):
    source = random_fcmae_state("atto")
    out = export_with_cli(source, folder / "atto_head.safetensors", "head=true", "num_classes=7")
    return out, dense_model(source, fresh_head("atto", 7))


def tiny_classifier_with_head(folder: Path):
    """tiny: timm's Linear MLPs (atto's are 1x1 convs), and a trained, random head."""
    source = random_fcmae_state("tiny")
    classifier = dense_model(source, random_classifier_head(source, 5))
    return export_with_function(classifier.state_dict(), folder / "tiny.safetensors"), classifier


CASES = [
    Case("resnet50-spark-encoder-cli", "resnet50", 0, resnet50_spark_encoder_via_cli),
    Case("resnet18-classifier-head", "resnet18", 10, resnet18_classifier_with_head),
    Case("atto-fcmae-encoder-cli", "convnextv2_atto", 0, atto_fcmae_encoder_via_cli),
    Case("atto-fcmae-fresh-head-cli", "convnextv2_atto", 7, atto_fcmae_with_fresh_head_via_cli),
    Case("tiny-classifier-head", "convnextv2_tiny", 5, tiny_classifier_with_head),
]


def case_named(name: str) -> Case:
    return next(c for c in CASES if c.name == name)


def prepare(case: Case, folder: Path, x: torch.Tensor) -> tuple[Path, Path]:
    """-> (the exported file, our outputs on `x` saved for the timm side)."""
    weights, model = case.make(folder)
    expected = folder / f"{case.name}_expected.pt"
    torch.save(our_outputs(model, x), expected)
    return weights, expected


# -- the checks ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_timm_loads_the_export_strictly_and_gives_our_outputs(case, timm_python, images, tmp_path):
    x, inputs = images
    weights, expected = prepare(case, tmp_path, x)
    status, result = run_timm_check(timm_python, weights, case.timm_model, case.num_classes, inputs, expected)
    print(json.dumps(result))  # the measured errors, shown with -s
    assert status == 0 and result["ok"], result
    assert result["strict_load"] == "ok" and result["timm"] == "1.0.31"
    compared = set(torch.load(expected, weights_only=True))
    assert set(result["relative_error"]) == compared
    assert ("logits" in compared) == (case.num_classes > 0)


@pytest.fixture(scope="module")
def resnet18_export(timm_python, images, tmp_path_factory):
    """The resnet18 export with its head, and our outputs: the file the broken variants start from."""
    return prepare(case_named("resnet18-classifier-head"), tmp_path_factory.mktemp("resnet18"), images[0])


def rewrite(path: Path, change) -> Path:
    """A copy of the export at `path`, its state dict passed through `change`."""
    sd, meta = read_state_dict(path)
    change(sd)
    return write_state_dict(sd, path.with_name("broken_" + path.name), meta)


def test_check_fails_when_two_running_means_are_swapped(timm_python, images, resnet18_export):
    """Same shapes, so timm's strict load takes the file; the features must give it away."""
    weights, expected = resnet18_export

    def swap(sd):
        a, b = "layer1.0.bn1.running_mean", "layer1.0.bn2.running_mean"
        sd[a], sd[b] = sd[b], sd[a]

    status, result = run_timm_check(timm_python, rewrite(weights, swap), "resnet18", 10, images[1], expected)
    assert status == 1 and not result["ok"] and result["strict_load"] == "ok", result
    assert result["relative_error"]["features"] > 100 * TOLERANCE, result


def test_check_fails_and_names_a_missing_key(timm_python, images, resnet18_export):
    weights, expected = resnet18_export
    broken = rewrite(weights, lambda sd: sd.pop("layer4.1.bn2.running_var"))
    status, result = run_timm_check(timm_python, broken, "resnet18", 10, images[1], expected)
    assert status == 1 and result["strict_load"] == "refused", result
    assert result["missing"] == ["layer4.1.bn2.running_var"] and "unexpected" not in result


def test_timm_refuses_a_convnext_encoder_export_without_its_head_norm(timm_python, images, tmp_path):
    """What every ConvNeXt V2 encoder export was before it carried timm's head.norm: timm's
    convnextv2_*(num_classes=0) keeps that LayerNorm, so its strict load refused the file."""
    x, inputs = images
    weights, expected = prepare(case_named("atto-fcmae-encoder-cli"), tmp_path, x)
    broken = rewrite(weights, lambda sd: [sd.pop(k) for k in ("head.norm.weight", "head.norm.bias")])
    status, result = run_timm_check(timm_python, broken, "convnextv2_atto", 0, inputs, expected)
    assert status == 1 and result["strict_load"] == "refused", result
    assert result["missing"] == ["head.norm.weight", "head.norm.bias"]
