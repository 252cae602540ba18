"""Which package may import which, checked on the source: the layering the code documents
holds, with no circle and no upward arrow. Imports under `if TYPE_CHECKING:` (type hints
only) do not count."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparse_mae"


def runtime_imports(path: Path) -> set[str]:
    """Modules a file imports when it runs (anywhere in it, functions included)."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", files("models"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_models_import_no_backend_and_no_kernel_package(path):
    """The models state their own facts (models/geometry.py) and are handed a backend object;
    the backends run the models, and `sparse_mae.create_model` (build.py) picks one by name."""
    imported = runtime_imports(path)
    assert not {m for m in imported if m.startswith(("sparse_mae.backends", "sparse_mae_kernels", "sparse_mae.build"))}


def test_the_kernel_package_imports_no_sparse_mae():
    """sparse_mae_kernels is the bottom layer: it takes every epsilon as an argument, and its
    compiled kernel size is checked against the model's by the native backend (and below)."""
    for path in sorted(ROOT.parent.joinpath("kernels").rglob("*.py")):
        assert not {m for m in runtime_imports(path) if m == "sparse_mae" or m.startswith("sparse_mae.")}, path


def test_the_kernels_are_built_for_the_models_depthwise_size():
    from sparse_mae.models.geometry import KERNEL_SIZE
    from sparse_mae_kernels import constants

    assert constants.KERNEL_SIZE == KERNEL_SIZE and constants.TAPS == KERNEL_SIZE * KERNEL_SIZE


@pytest.mark.parametrize("path", files("apps"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_app_imports_another_app(path):
    allowed = {"sparse_mae.apps", "sparse_mae.apps.app"}  # the shared entry-point helpers
    others = {m for m in runtime_imports(path) if m.startswith("sparse_mae.apps") and m not in allowed}
    assert not others, f"{path.name} imports {others}: move what they share into a library folder"


@pytest.mark.parametrize("path", [*files("data"), *files("models"), *files("train"), *files("backends"), *files("probe")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_library_code_does_not_import_the_apps(path):
    assert not {m for m in runtime_imports(path) if m.startswith("sparse_mae.apps")}


def test_transforms_do_not_import_the_datasets():
    """data/transforms.py is below every dataset (builtin imports it, never the reverse)."""
    assert not {m for m in runtime_imports(ROOT / "data" / "transforms.py") if m.startswith("sparse_mae.data.")}


def test_the_patch_size_is_defined_once():
    """The patch size is written in one place (models/geometry.py, as the product of the
    stage reductions); the rest import it."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PATCH" for t in node.targets):
                offenders.append(str(path.relative_to(ROOT)))
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mod)) \
                    and isinstance(node.right, ast.Constant) and node.right.value == 32:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} // 32 or % 32")
    assert offenders == ["models/geometry.py"]


def test_the_architecture_facts_are_defined_once():
    """Stage reductions, norms' eps and the kernel size are the model's (models/geometry.py);
    the kernel package states only the depthwise size its code is compiled for."""
    facts = {"NUM_STAGES", "STEM_STRIDE", "DOWNSAMPLE_STRIDE", "STAGE_STRIDES", "STAGE_UPSAMPLE",
             "STAGE_SITES_PER_PATCH", "KERNEL_SIZE", "LN_EPS", "GRN_EPS"}
    where: dict[str, list[str]] = {}
    for path in [*ROOT.rglob("*.py"), *ROOT.parent.joinpath("kernels").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if getattr(t, "id", "") in facts:
                        where.setdefault(t.id, []).append(str(path.relative_to(ROOT.parent)))
    assert where.pop("KERNEL_SIZE") == ["sparse_mae/models/geometry.py", "kernels/constants.py"]
    assert where == {name: ["sparse_mae/models/geometry.py"] for name in facts - {"KERNEL_SIZE"}}
