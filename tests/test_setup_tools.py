"""The set-up scripts' choices (tools/setup_env.sh, tools/install_minkowski.sh) with the
machine simulated, and the MinkowskiEngine CUDA patch set against the real 0.5.4 sdist.

The scripts run in their --print-plan mode, which decides everything and installs
nothing. A machine is simulated with a fake `nvidia-smi` (a GPU, or a driver that does
not answer) first on PATH, a fake CUDA toolkit (CUDA_HOME with a fake `nvcc`), and a
fake project venv whose python sees a stand-in `torch` module (a CPU or a CUDA build)
and no MinkowskiEngine.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load_cuda_home_tool():
    # tools/ is scripts, not a package: load the helper from its file.
    spec = importlib.util.spec_from_file_location("cuda_home_from_wheels", REPO / "tools" / "cuda_home_from_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_cuda_home = _load_cuda_home_tool().build_cuda_home
SETUP_ENV = REPO / "tools" / "setup_env.sh"
INSTALL_ME = REPO / "tools" / "install_minkowski.sh"
PATCH_DIR = REPO / "tools" / "minkowski_patches"
ME_SDIST = "MinkowskiEngine-0.5.4.tar.gz"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="the set-up scripts are bash")


# -- the simulated machine ---------------------------------------------------------------------


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def fake_nvidia_smi(bin_dir: Path, compute_caps: list[str] | None) -> None:
    """compute_caps None: a machine whose driver does not answer (nvidia-smi fails, as it
    does without the kernel module); else one GPU per entry."""
    if compute_caps is None:
        _script(bin_dir / "nvidia-smi", "echo 'NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.'\nexit 9\n")
        return
    listing = "\n".join(f"GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:08d})" for i in range(len(compute_caps)))
    caps = "\n".join(compute_caps)
    _script(bin_dir / "nvidia-smi", f"""case "$*" in
  *compute_cap*) printf '%s\\n' "{caps}" ;;
  *-L*) printf '%s\\n' "{listing}" ;;
  *) exit 1 ;;
esac
""")


def fake_cuda_home(root: Path, release: str, headers=("cuda_runtime.h", "cusparse.h", "cublas_v2.h")) -> Path:
    _script(root / "bin" / "nvcc", f"echo 'Cuda compilation tools, release {release}, V{release}.1'\n")
    (root / "include").mkdir(parents=True, exist_ok=True)
    for header in headers:
        (root / "include" / header).write_text("")
    return root


def fake_venv(root: Path, torch_version: str, torch_cuda: str | None) -> Path:
    """A venv whose python is the test's python with a stand-in torch and no ME first on its path."""
    modules = root / "modules"
    (modules / "torch").mkdir(parents=True)
    (modules / "torch" / "__init__.py").write_text(
        f"__version__ = {torch_version!r}\n"
        "class version:\n"
        f"    cuda = {torch_cuda!r}\n"
    )
    (modules / "MinkowskiEngine").mkdir()
    (modules / "MinkowskiEngine" / "__init__.py").write_text("raise ImportError('not installed (simulated)')\n")
    _script(root / "venv" / "bin" / "python", f'PYTHONPATH="{modules}" exec "{sys.executable}" "$@"\n')
    return root / "venv"


def run_plan(script: Path, tmp_path: Path, *, gpus: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, str]:
    bin_dir = tmp_path / "fakebin"
    fake_nvidia_smi(bin_dir, gpus)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARSE_MAE_", "TORCH_CUDA_ARCH_LIST", "TORCH_VERSION", "CUDA_HOME", "VENV"))}
    full_env["PATH"] = f"{bin_dir}:{full_env['PATH']}"
    full_env["SPARSE_MAE_CACHE"] = str(tmp_path / "cache")
    full_env.update(env or {})
    result = subprocess.run(["bash", str(script), "--print-plan"], env=full_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


# -- which torch build (setup_env.sh) -----------------------------------------------------------


def test_torch_cpu_build_without_nvidia_driver(tmp_path):
    plan = run_plan(SETUP_ENV, tmp_path, gpus=None, env={"VENV": str(tmp_path / "none")})
    assert plan["torch_build"] == "cpu" and "no NVIDIA driver" in plan["torch_build_why"]
    assert plan["torch_action"] == "install" and plan["minkowski_build"] == "cpu"
    assert plan["torch_pip"] == "pip install torch==2.13.0"  # unchanged: pip's config may hold the CPU wheel
    # the registry's torchvision is a CUDA build that does not import with the CPU torch
    assert plan["torchvision"].startswith("none") and "data.decode=gpu" in plan["torchvision"]


def test_torch_cuda_build_with_nvidia_driver(tmp_path):
    plan = run_plan(SETUP_ENV, tmp_path, gpus=["9.0"], env={"VENV": str(tmp_path / "none")})
    assert plan["torch_build"] == "cuda" and "1 GPU(s)" in plan["torch_build_why"]
    assert "config files and find-links off" in plan["torch_pip"]
    assert plan["minkowski_build"] == "cuda"
    assert plan["torchvision"].startswith("pip install torchvision==0.28.0")


@pytest.mark.parametrize("override, gpus, expected", [("cpu", ["9.0"], "cpu"), ("cuda", None, "cuda")])
def test_torch_override_wins_over_the_machine(tmp_path, override, gpus, expected):
    plan = run_plan(SETUP_ENV, tmp_path, gpus=gpus, env={"VENV": str(tmp_path / "none"), "SPARSE_MAE_TORCH": override})
    assert plan["torch_build"] == expected and plan["torch_build_why"] == f"SPARSE_MAE_TORCH={override}"


@pytest.mark.parametrize("installed_cuda, gpus, override, action", [
    (None, None, None, "keep"),          # CPU machine, CPU torch: as before, nothing to do
    (None, ["9.0"], None, "reinstall"),  # a CPU torch on a GPU machine is replaced by the CUDA build
    ("13.0", ["9.0"], None, "keep"),
    ("13.0", None, None, "keep"),        # a CUDA torch runs on a CPU too: kept unless asked
    ("13.0", None, "cpu", "reinstall"),
])
def test_torch_action_follows_the_installed_build(tmp_path, installed_cuda, gpus, override, action):
    version = "2.13.0+cpu" if installed_cuda is None else "2.13.0"
    venv = fake_venv(tmp_path, version, installed_cuda)
    env = {"VENV": str(venv)} | ({"SPARSE_MAE_TORCH": override} if override else {})
    plan = run_plan(SETUP_ENV, tmp_path, gpus=gpus, env=env)
    assert plan["torch_action"] == action
    # ME follows the torch .venv ends up with.
    kept_build = "cpu" if installed_cuda is None else "cuda"
    assert plan["minkowski_build"] == (kept_build if action == "keep" else plan["torch_build"])
    assert plan["torchvision"].startswith("pip install" if plan["minkowski_build"] == "cuda" else "none")


def test_torch_of_another_version_is_installed(tmp_path):
    venv = fake_venv(tmp_path, "2.11.0+cpu", None)
    assert run_plan(SETUP_ENV, tmp_path, env={"VENV": str(venv)})["torch_action"] == "install"


def test_bad_torch_override_is_a_clear_error(tmp_path):
    env = os.environ | {"SPARSE_MAE_TORCH": "rocm"}
    result = subprocess.run(["bash", str(SETUP_ENV), "--print-plan"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "SPARSE_MAE_TORCH must be auto, cpu or cuda" in result.stderr


# -- which MinkowskiEngine build (install_minkowski.sh) ----------------------------------------


def test_cpu_torch_gets_the_cpu_build_in_the_unchanged_cache_slot(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0+cpu", None)
    plan = run_plan(INSTALL_ME, tmp_path, env={"VENV": str(venv)})
    assert plan["build"] == "cpu"
    # The slot CPU wheels were always cached in: existing caches stay valid.
    assert plan["wheel_dir"] == str(tmp_path / "cache" / "wheels" / "torch-2.13.0")
    assert "nvcc" not in plan and "patches" not in plan
    assert plan["action"] == "build"


def test_cached_cpu_wheel_is_installed_not_rebuilt(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0+cpu", None)
    slot = tmp_path / "cache" / "wheels" / "torch-2.13.0"
    slot.mkdir(parents=True)
    (slot / "MinkowskiEngine-0.5.4-cp311-cp311-linux_x86_64.whl").write_text("")
    assert run_plan(INSTALL_ME, tmp_path, env={"VENV": str(venv)})["action"] == "install-cached"


def test_cuda_torch_on_a_gpu_machine_builds_for_its_architecture_with_the_matching_system_nvcc(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    home = fake_cuda_home(tmp_path / "cuda-13.0", "13.0")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["9.0", "9.0"], env={"VENV": str(venv), "CUDA_HOME": str(home)})
    assert plan["build"] == "cuda" and plan["torch_cuda"] == "13.0"
    assert plan["cuda_archs"] == "9.0" and "GPUs" in plan["cuda_archs_from"]
    assert plan["nvcc"] == "system" and plan["cuda_home"] == str(home)
    assert plan["wheel_dir"] == str(tmp_path / "cache" / "wheels" / "torch-2.13.0-cu130-sm90")
    assert plan["patches"].split() == sorted(p.name for p in PATCH_DIR.glob("*.patch"))


def test_system_nvcc_of_another_major_version_falls_back_to_the_pip_wheels(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    home = fake_cuda_home(tmp_path / "cuda-12.4", "12.4")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["8.0"], env={"VENV": str(venv), "CUDA_HOME": str(home)})
    assert plan["nvcc"] == "pip" and "12.4" in plan["nvcc_why"] and "does not match" in plan["nvcc_why"]
    # CUDA 13 wheels have no -cu13 suffix; all pinned to torch's CUDA release.
    assert plan["nvcc_wheels"].split() == [
        "nvidia-cuda-nvcc==13.0.*", "nvidia-cuda-crt==13.0.*", "nvidia-nvvm==13.0.*",
        "nvidia-cuda-cccl==13.0.*", "nvidia-cuda-runtime==13.0.*",
    ]


def test_cuda12_torch_without_a_toolkit_uses_the_cu12_wheels_and_the_default_architectures(tmp_path):
    venv = fake_venv(tmp_path, "2.7.1", "12.6")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=None, env={"VENV": str(venv), "CUDA_HOME": str(tmp_path / "absent"),
                                                          "TORCH_VERSION": "2.7.1"})
    assert plan["nvcc"] == "pip" and plan["nvcc_why"].startswith("no complete system CUDA toolkit")
    assert plan["nvcc_wheels"].split() == [
        "nvidia-cuda-nvcc-cu12==12.6.*", "nvidia-cuda-cccl-cu12==12.6.*", "nvidia-cuda-runtime-cu12==12.6.*",
    ]
    assert plan["cuda_archs"] == "8.0;9.0" and "default" in plan["cuda_archs_from"]
    assert plan["wheel_dir"].endswith("wheels/torch-2.7.1-cu126-sm80-sm90")


def test_system_toolkit_without_cusparse_headers_is_not_used(tmp_path):
    """A toolkit with nvcc but no cuSPARSE/cuBLAS headers (e.g. assembled from a few NVIDIA
    wheels) cannot compile ME: the pip wheels are used instead."""
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    home = fake_cuda_home(tmp_path / "cuda-13.0", "13.0", headers=("cuda_runtime.h",))
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["9.0"], env={"VENV": str(venv), "CUDA_HOME": str(home)})
    assert plan["nvcc"] == "pip" and "cusparse.h" in plan["nvcc_why"]


def test_architecture_and_nvcc_overrides(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    home = fake_cuda_home(tmp_path / "cuda-13.0", "13.0")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["9.0"], env={
        "VENV": str(venv), "CUDA_HOME": str(home), "SPARSE_MAE_NVCC": "pip", "SPARSE_MAE_CUDA_ARCHS": "8.0;8.6;9.0+PTX"})
    assert plan["nvcc"] == "pip" and plan["cuda_archs"] == "8.0;8.6;9.0+PTX"
    # Different architectures, different wheel: the key holds them all.
    assert plan["wheel_dir"].endswith("wheels/torch-2.13.0-cu130-sm80-sm86-sm90ptx")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["9.0"], env={"VENV": str(venv), "TORCH_CUDA_ARCH_LIST": "8.9"})
    assert plan["cuda_archs"] == "8.9" and plan["cuda_archs_from"] == "TORCH_CUDA_ARCH_LIST"


def test_cpu_build_can_be_forced_under_a_cuda_torch(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    plan = run_plan(INSTALL_ME, tmp_path, gpus=["9.0"], env={"VENV": str(venv), "SPARSE_MAE_MINKOWSKI_BUILD": "cpu"})
    assert plan["build"] == "cpu" and plan["wheel_dir"].endswith("wheels/torch-2.13.0")


@pytest.mark.parametrize("env, message", [
    ({"SPARSE_MAE_MINKOWSKI_BUILD": "cuda"}, "needs a CUDA build of torch"),
    ({"SPARSE_MAE_NVCC": "system", "SPARSE_MAE_MINKOWSKI_BUILD": "cuda"}, "needs a CUDA build of torch"),
    ({"SPARSE_MAE_MINKOWSKI_BUILD": "gpu"}, "must be auto, cpu or cuda"),
])
def test_impossible_minkowski_requests_are_clear_errors(tmp_path, env, message):
    venv = fake_venv(tmp_path, "2.13.0+cpu", None)
    full_env = os.environ | {"VENV": str(venv), "SPARSE_MAE_CACHE": str(tmp_path / "cache")} | env
    result = subprocess.run(["bash", str(INSTALL_ME), "--print-plan"], env=full_env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and message in result.stderr


def test_system_nvcc_forced_but_mismatched_is_a_clear_error(tmp_path):
    venv = fake_venv(tmp_path, "2.13.0", "13.0")
    home = fake_cuda_home(tmp_path / "cuda-12.4", "12.4")
    full_env = os.environ | {"VENV": str(venv), "CUDA_HOME": str(home), "SPARSE_MAE_NVCC": "system",
                             "SPARSE_MAE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", str(INSTALL_ME), "--print-plan"], env=full_env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "does not match torch's CUDA 13.0" in result.stderr and "SPARSE_MAE_NVCC=pip" in result.stderr


# -- a CUDA_HOME from NVIDIA's wheels ------------------------------------------------------------


# -- tools/timm_env.sh (the side venv with real timm) -------------------------------------------

TIMM_ENV = REPO / "tools" / "timm_env.sh"
TIMM_PINS = "torch==2.14.1 torchvision==0.29.1 timm==1.0.31"


def fake_python_for_timm_env(tmp_path: Path, pip_status: int) -> tuple[Path, Path]:
    """A stand-in for python3 whose `-m venv DIR` makes a venv whose pip exits `pip_status`
    and logs each call; -> (the fake python3, the pip log)."""
    log = tmp_path / "pip.log"
    venv_python = _script(tmp_path / "fake" / "venv_python", f"""case "$*" in
  "-m pip"*) echo "$*" >> '{log}'; exit {pip_status} ;;
  *) exit 0 ;;
esac
""")
    python = _script(tmp_path / "fake" / "python3", f"""[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin" && cp '{venv_python}' "$3/bin/python"
""")
    return python, log


def run_timm_env(python: Path, venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TIMM_ENV)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(python), "TIMM_VENV": str(venv)})


def test_timm_env_names_the_pins_when_pip_fails(tmp_path):
    python, _ = fake_python_for_timm_env(tmp_path, pip_status=1)
    r = run_timm_env(python, tmp_path / "venv")
    assert r.returncode == 1
    assert f"[timm-env] ERROR: pip could not install {TIMM_PINS} into {tmp_path / 'venv'}" in r.stderr
    assert not (tmp_path / "venv" / ".timm-env-stamp").exists()  # the next run tries again


def test_timm_env_installs_once_and_again_when_the_pins_change(tmp_path):
    python, log = fake_python_for_timm_env(tmp_path, pip_status=0)
    venv = tmp_path / "venv"
    for _ in range(2):
        assert run_timm_env(python, venv).returncode == 0
    assert log.read_text().splitlines() == [f"-m pip install --quiet {TIMM_PINS}"]  # the second run: the stamp
    (venv / ".timm-env-stamp").write_text("torch==2.14.0 torchvision==0.29.0 timm==1.0.30\n")
    assert run_timm_env(python, venv).returncode == 0
    assert len(log.read_text().splitlines()) == 2


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cuda_home_from_cuda13_wheels(tmp_path):
    """One shared tree (nvidia/cu13) with versioned libraries only: lib64 gets the
    unversioned names the linker wants."""
    cu13 = tmp_path / "site" / "nvidia" / "cu13"
    for rel in ("bin/nvcc", "include/cuda_runtime.h", "include/cusparse.h", "include/cccl/thrust/sort.h",
                "lib/libcudart.so.13", "lib/libcusparse.so.12", "nvvm/bin/cicc"):
        _touch(cu13 / rel, rel)
    _touch(tmp_path / "site" / "nvidia" / "cudnn" / "lib" / "libcudnn.so.9")
    out = tmp_path / "cuda-home"
    assert build_cuda_home(tmp_path / "site", out) == []
    assert (out / "bin" / "nvcc").read_text() == "bin/nvcc"
    assert (out / "lib64" / "libcudart.so").resolve() == (cu13 / "lib" / "libcudart.so.13").resolve()
    assert (out / "lib64" / "libcusparse.so").exists() and (out / "lib64" / "libcudnn.so").exists()
    assert (out / "include" / "cccl" / "thrust" / "sort.h").exists() and (out / "nvvm" / "bin" / "cicc").exists()


def test_cuda_home_from_cuda12_wheels_merges_the_packages(tmp_path):
    nvidia = tmp_path / "site" / "nvidia"
    _touch(nvidia / "cuda_nvcc" / "bin" / "nvcc")
    _touch(nvidia / "cuda_nvcc" / "include" / "crt" / "host_defines.h")
    _touch(nvidia / "cuda_runtime" / "include" / "cuda_runtime.h")
    _touch(nvidia / "cuda_runtime" / "include" / "crt" / "host_config.h")  # same folder in two wheels
    _touch(nvidia / "cuda_runtime" / "lib" / "libcudart.so.12")
    _touch(nvidia / "cuda_cccl" / "include" / "thrust" / "sort.h")
    _touch(nvidia / "cusparse" / "include" / "cusparse.h")
    _touch(nvidia / "cusparse" / "lib" / "libcusparse.so.12")
    out = tmp_path / "cuda-home"
    assert build_cuda_home(tmp_path / "site", out) == []
    assert (out / "include" / "crt" / "host_defines.h").exists() and (out / "include" / "crt" / "host_config.h").exists()
    assert (out / "include" / "thrust" / "sort.h").exists() and (out / "lib64" / "libcudart.so").exists()


def test_cuda_home_from_incomplete_wheels_names_what_is_missing(tmp_path):
    _touch(tmp_path / "site" / "nvidia" / "cu13" / "bin" / "nvcc")
    problems = build_cuda_home(tmp_path / "site", tmp_path / "cuda-home")
    assert any("cuda_runtime.h" in p and "nvidia-cuda-runtime" in p for p in problems)
    assert any("thrust" in p and "nvidia-cuda-cccl" in p for p in problems)


# -- the patch set against the real sdist -----------------------------------------------------------


@pytest.fixture(scope="module")
def me_sdist() -> Path:
    """The ME 0.5.4 sdist from the set-up cache; fetched into it once when missing."""
    cache = Path(os.environ.get("SPARSE_MAE_CACHE", Path.home() / ".cache" / "sparse-mae"))
    tarball = cache / "sdist" / ME_SDIST
    if not tarball.exists():
        env = os.environ | {"VENV": str(Path(sys.executable).parents[1])}
        result = subprocess.run(["bash", str(INSTALL_ME), "--fetch-sdist"], env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"could not fetch the sdist: {result.stderr[-2000:]}"
    return tarball


@pytest.fixture()
def sdist_tree(me_sdist, tmp_path) -> Path:
    with tarfile.open(me_sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "MinkowskiEngine-0.5.4"


def _patch(tree: Path, patch_file: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["patch", "-d", str(tree), "-p1", "--forward", "--fuzz=0", *extra],
                          stdin=patch_file.open(), capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(shutil.which("patch") is None, reason="'patch' is not installed")
def test_patch_set_applies_cleanly_in_order_and_only_once(sdist_tree):
    patches = sorted(PATCH_DIR.glob("*.patch"))
    assert len(patches) >= 5
    for patch_file in patches:
        result = _patch(sdist_tree, patch_file)
        # Clean: no fuzz, no offsets, no rejects.
        assert result.returncode == 0 and "offset" not in result.stdout and "fuzz" not in result.stdout, \
            f"{patch_file.name}: {result.stdout}{result.stderr}"
    assert not list(sdist_tree.rglob("*.rej")) and not list(sdist_tree.rglob("*.orig"))
    # Applied twice is an error, so a re-run can never stack the same change.
    assert _patch(sdist_tree, patches[0], "--dry-run").returncode != 0


@pytest.mark.skipif(shutil.which("patch") is None, reason="'patch' is not installed")
def test_patched_sdist_has_the_fixes_and_keeps_the_cpu_sources(sdist_tree, me_sdist):
    for patch_file in sorted(PATCH_DIR.glob("*.patch")):
        assert _patch(sdist_tree, patch_file).returncode == 0
    src = sdist_tree / "src"
    assert "#include <thrust/remove.h>" in (src / "coordinate_map_gpu.cu").read_text()
    assert "#include <thrust/execution_policy.h>" in (src / "3rdparty" / "concurrent_unordered_map.cuh").read_text()
    assert "public thrust::unary_function" not in (src / "coordinate_map_functors.cuh").read_text()
    assert "cudaMemLocation" in (src / "3rdparty" / "concurrent_unordered_map.cuh").read_text()
    assert '["-DCCCL_DISABLE_NVTX"]' in (sdist_tree / "setup.py").read_text()
    # Every patched file is CUDA-only, or setup.py's CUDA source set: the CPU build compiles
    # exactly the sources it compiled before.
    touched = {line.split()[1].removeprefix("b/") for p in PATCH_DIR.glob("*.patch")
               for line in p.read_text().splitlines() if line.startswith("+++ ")}
    assert all(t.endswith((".cu", ".cuh")) or t == "setup.py" for t in touched), touched


def test_patches_are_documented():
    doc = (REPO / "docs" / "minkowski.md").read_text()
    for patch_file in PATCH_DIR.glob("*.patch"):
        assert patch_file.name in doc, f"{patch_file.name} is not described in docs/minkowski.md"
        assert "sparse-mae patch:" in patch_file.read_text()  # each change says why, in place
