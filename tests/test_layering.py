"""Which package may import which, checked on the source: the layering the code documents
holds, with no circle and no upward arrow. Imports under `if TYPE_CHECKING:` (type hints
only) do not count. And the tree shows the import names: each top-level source folder
holds one package folder named as it installs, so a reader (and an import-graph tool)
finds `sparse_mae_kernels` and `sparse_mae_conf` in the tree."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "sparse_mae"
# The card's top-level source folders and the package folder each one holds, named as it imports.
PACKAGE_FOLDERS = {"sparse_mae": "sparse_mae", "sparse_mae_kernels": "kernels/sparse_mae_kernels",
                   "sparse_mae_conf": "conf/sparse_mae_conf"}


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
    assert where.pop("KERNEL_SIZE") == ["sparse_mae/models/geometry.py", "kernels/sparse_mae_kernels/constants.py"]
    assert where == {name: ["sparse_mae/models/geometry.py"] for name in facts - {"KERNEL_SIZE"}}


def installed_distribution(monkeypatch):
    """What setuptools itself makes of pyproject.toml: packages, their folders, their data."""
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config.pyprojecttoml import apply_configuration

    monkeypatch.chdir(REPO)  # build_py reads the package folders relative to the project root
    return apply_configuration(setuptools.Distribution(), "pyproject.toml")


def test_each_source_folder_installs_the_package_named_by_its_folder(monkeypatch):
    dist = installed_distribution(monkeypatch)
    top = sorted(p for p in dist.packages if "." not in p)
    folders = {name: (dist.package_dir or {}).get(name, name) for name in top}
    assert folders == PACKAGE_FOLDERS
    for name, folder in folders.items():
        assert Path(folder).name == name and (REPO / folder / "__init__.py").is_file()
    for outer in ("kernels", "conf"):  # a source root, not a package: only the package folder is Python
        python = sorted(p.name for p in (REPO / outer).iterdir()
                        if p.suffix == ".py" or (p / "__init__.py").exists())
        assert python == [Path(PACKAGE_FOLDERS[f"sparse_mae_{outer}"]).name], outer
    from sparse_mae.apps.app import CONFIG_MODULE

    assert CONFIG_MODULE in PACKAGE_FOLDERS  # Hydra's pkg:// name is a folder in the tree


def test_the_install_ships_the_c_sources_and_every_config(monkeypatch):
    """What build_py copies into a wheel: the kernels' csrc/*.c, *.h and every yaml under conf/.
    pyproject.toml's package-data alone ships them (there is no MANIFEST.in), so the check
    leaves out the manifest pass, which would write an egg-info into the tree."""
    dist = installed_distribution(monkeypatch)
    dist.include_package_data = False
    build_py = dist.get_command_obj("build_py")
    build_py.ensure_finalized()
    shipped = {Path(src_dir, name).resolve() for _, src_dir, _, names in build_py.data_files for name in names}
    wanted = {*(REPO / "kernels").rglob("csrc/*.[ch]"), *(REPO / "conf").rglob("*.yaml")}
    assert wanted and {p.resolve() for p in wanted} <= shipped


def test_the_native_backend_imports_the_kernels_folder_by_its_installed_name():
    """An import-graph reader that takes the folders of pyproject.toml's `where` as source
    roots (as src layouts are read) finds every kernels module the native engine imports."""
    roots = [REPO, REPO / "kernels", REPO / "conf"]

    def resolves(module: str) -> bool:
        rel = Path(*module.split("."))
        return any((r / rel).with_suffix(".py").is_file() or (r / rel / "__init__.py").is_file() for r in roots)

    used = {m for p in files("backends/native") for m in runtime_imports(p) if m.split(".")[0] == "sparse_mae_kernels"}
    assert "sparse_mae_kernels" in used and any(m.startswith("sparse_mae_kernels.ops.") for m in used)
    assert all(resolves(m) for m in used), sorted(m for m in used if not resolves(m))


@pytest.mark.parametrize("folder", ["sparse_mae", "kernels", "benchmarks", "tests"])
def test_nothing_imports_the_folder_names_kernels_or_conf(folder):
    """`kernels` on PyPI is another project; the folder names are never import names."""
    bare = {f"{p.relative_to(REPO)}: {m}" for p in (REPO / folder).rglob("*.py") for m in runtime_imports(p)
            if m.split(".")[0] in ("kernels", "conf")}
    assert not bare


def test_the_timm_check_imports_torch_and_timm_only():
    """tools/timm_check.py is the independent loader of our exports (tests/test_timm_loads_exports.py):
    it must share no code with the exporter."""
    used = {m.split(".")[0] for m in runtime_imports(REPO / "tools" / "timm_check.py")}
    assert used - set(sys.stdlib_module_names) == {"torch", "timm"}


# -- the whole layer order -----------------------------------------------------------------

# Bottom to top; a file may import files of its own layer or of layers below, never above.
# Leaves first (errors, io: anything may raise or write atomically), then what the models and
# data are, the engines that run them, the configs that choose them, the training loop, and
# what is built on a trained model. `sparse_mae/__init__.py` (the public API) and the CLI sit
# on top.
LAYERS = [
    {"errors", "io"},
    {"data", "models"},
    {"backends", "build", "flops"},  # build: create_model picks a backend and hands it to the model
    {"config"},
    {"train"},
    {"convert"},
    {"bench"},
    {"probe"},
    {"apps", "cli", "__init__"},
]
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(path: Path) -> str:
    """The layer unit of a file: its top folder under sparse_mae/, or its own name there."""
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_files(path: Path) -> set[Path]:
    """The files of sparse_mae/ that `path` imports when it runs (a package's __init__ for a
    package import)."""
    found = set()
    for module in runtime_imports(path):
        parts = module.split(".")
        if parts[0] != "sparse_mae":
            continue
        base = ROOT.joinpath(*parts[1:])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file() and candidate != path:
                found.add(candidate)
                break
    return found


ALL_FILES = sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in ALL_FILES} <= set(LAYER_OF), "add the new folder or module to LAYERS"


@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_climbs_a_layer(path):
    here = LAYER_OF[unit_of(path)]
    climbing = sorted(str(f.relative_to(ROOT)) for f in imported_files(path) if LAYER_OF[unit_of(f)] > here)
    assert not climbing, (f"{path.relative_to(ROOT)} (layer {sorted(LAYERS[here])}) imports {climbing} from a "
                          f"higher layer: move what it needs down, or the importing code up")


def test_no_circle_among_the_files():
    graph = {p: imported_files(p) for p in ALL_FILES}
    for p in ALL_FILES:  # a package's files import through its __init__, which is not a circle of code
        graph[p].discard(p.parent / "__init__.py")
    state: dict[Path, int] = {}  # 1 on the path being walked, 2 done
    circles = []

    def walk(node: Path, trail: list[Path]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append([str(p.relative_to(ROOT)) for p in trail[trail.index(nxt):] + [nxt]])
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for p in ALL_FILES:
        if p not in state:
            walk(p, [p])
    assert not circles, circles
