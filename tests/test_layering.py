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


@pytest.mark.parametrize("path", files("backends"), ids=lambda p: str(p.relative_to(ROOT)))
def test_backends_do_not_import_the_models(path):
    """The models (FCMAE) pick a backend; a backend runs whatever encoder it is handed."""
    assert not {m for m in runtime_imports(path) if m.startswith("sparse_mae.models")}


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
    """32 as the patch size is written in one place (backends/base.py); the rest import it."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "PATCH" for t in node.targets):
                offenders.append(str(path.relative_to(ROOT)))
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.FloorDiv, ast.Mod)) \
                    and isinstance(node.right, ast.Constant) and node.right.value == 32:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} // 32 or % 32")
    assert offenders == ["backends/base.py"]
