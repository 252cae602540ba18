#!/usr/bin/env bash
# Installs MinkowskiEngine 0.5.4 into the project venv; safe to run again.
#
#   bash tools/install_minkowski.sh               # build (once, cached) and install
#   bash tools/install_minkowski.sh --print-plan  # say what it would do, change nothing
#
# Upstream ME only ships an sdist that no longer builds with a current toolchain, so we
# build it once in a throw-away venv with the old pins it needs (numpy<2 for
# numpy.distutils' BLAS lookup, setuptools 59.8 for its setup.py), cache the wheel
# outside the repo, and install that wheel into $VENV. Later runs reuse the cache, and
# do nothing at all when a fitting ME already imports in $VENV. See docs/design.md
# section 4 and docs/minkowski.md.
#
# Which build: the one that fits the torch in $VENV. A CPU torch gets the CPU build,
# exactly as before (cache slot wheels/torch-<version>/). A CUDA torch gets the CUDA
# build: the sdist patched for current CUDA 12/13 toolchains (tools/minkowski_patches/),
# compiled with the system nvcc when its CUDA major version matches torch's, else with
# nvcc, CCCL and runtime headers from NVIDIA's pip wheels; for the GPUs' architectures,
# or 8.0;9.0 when no GPU is visible; cached under
# wheels/torch-<version>-cu<cuda>-sm<archs>/.
#
# Environment:
#   SPARSE_MAE_MINKOWSKI_BUILD=auto|cpu|cuda   auto (default): follow $VENV's torch
#   SPARSE_MAE_NVCC=auto|system|pip            auto (default): system nvcc if it matches
#   SPARSE_MAE_CUDA_ARCHS="8.0;9.0"            architectures (else TORCH_CUDA_ARCH_LIST,
#                                              else the GPUs', else 8.0;9.0)
#   SPARSE_MAE_CACHE=~/.cache/sparse-mae       wheel and sdist cache
#   MAX_JOBS=N                                 parallel compile jobs (CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ME_VERSION=0.5.4
CACHE_DIR=${SPARSE_MAE_CACHE:-$HOME/.cache/sparse-mae}
SDIST_DIR="$CACHE_DIR/sdist"
PATCH_DIR="$PWD/tools/minkowski_patches"
DEFAULT_CUDA_ARCHS="8.0;9.0"
PY="$VENV/bin/python"

PRINT_PLAN=0
FETCH_SDIST=0
case "${1:-}" in
  --print-plan) PRINT_PLAN=1 ;;
  --fetch-sdist) FETCH_SDIST=1 ;;
  "") ;;
  *) echo "usage: bash tools/install_minkowski.sh [--print-plan | --fetch-sdist]" >&2; exit 2 ;;
esac

log() { echo "[minkowski] $*" >&2; }
die() { echo "[minkowski] ERROR: $*" >&2; exit 1; }
plan() { echo "$1=$2"; }  # the --print-plan output: key=value lines on stdout

[ -x "$PY" ] || die "$PY not found; run 'bash tools/setup_env.sh' (or 'make setup') first."

# -- facts about the venv's torch and the machine --------------------------------------

# "<version> <cuda version or none>" of the torch in $VENV.
TORCH_FACTS=$("$PY" -c "import torch; print(torch.__version__, torch.version.cuda or 'none')" 2>/dev/null) \
  || die "torch does not import in $VENV; run 'bash tools/setup_env.sh' (or 'make setup') first."
TORCH_INSTALLED=${TORCH_FACTS% *}
TORCH_CUDA=${TORCH_FACTS#* }

BUILD=${SPARSE_MAE_MINKOWSKI_BUILD:-auto}
case "$BUILD" in
  auto) if [ "$TORCH_CUDA" = none ]; then BUILD=cpu; else BUILD=cuda; fi ;;
  cpu) ;;
  cuda)
    [ "$TORCH_CUDA" != none ] || die "SPARSE_MAE_MINKOWSKI_BUILD=cuda needs a CUDA build of torch, but $VENV has torch $TORCH_INSTALLED; run 'SPARSE_MAE_TORCH=cuda bash tools/setup_env.sh' first."
    ;;
  *) die "SPARSE_MAE_MINKOWSKI_BUILD must be auto, cpu or cuda (got '$BUILD')." ;;
esac

# CUDA release "X.Y" of an nvcc, or nothing.
nvcc_release() { "$1" --version 2>/dev/null | sed -n 's/.*release \([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1; }

# The system toolkit's root, or nothing. Complete means nvcc plus the runtime, cuSPARSE
# and cuBLAS headers that ME and torch's CUDA headers include (a toolkit assembled from
# a few NVIDIA wheels may lack the last two). CUDA_HOME, when set, is the only
# candidate; else nvcc on PATH, else /usr/local/cuda.
system_cuda_home() {
  local candidates=() nvcc
  if [ -n "${CUDA_HOME+set}" ]; then
    candidates+=("$CUDA_HOME")
  else
    if nvcc=$(command -v nvcc 2>/dev/null); then
      candidates+=("$(dirname "$(dirname "$(readlink -f "$nvcc")")")")
    fi
    candidates+=(/usr/local/cuda)
  fi
  local home
  for home in "${candidates[@]}"; do
    if [ -x "$home/bin/nvcc" ] && [ -f "$home/include/cuda_runtime.h" ] \
       && [ -f "$home/include/cusparse.h" ] && [ -f "$home/include/cublas_v2.h" ]; then
      echo "$home"
      return
    fi
  done
}

# "8.0;9.0" -> "sm80-sm90" (a "+PTX" suffix -> "ptx"), for the cache key.
archs_key() { echo "$1" | tr ' ;,' '\n\n\n' | sed '/^$/d; s/+PTX/ptx/I; s/\.//; s/^/sm/' | paste -sd- -; }

# The NVIDIA wheels that carry nvcc, CCCL and the runtime headers for CUDA "X.Y".
pip_toolchain_requirements() {
  local release=$1 major=${1%%.*}
  if [ "$major" -ge 13 ]; then  # from CUDA 13 on the wheels drop the -cuXX suffix
    echo "nvidia-cuda-nvcc==$release.* nvidia-cuda-crt==$release.* nvidia-nvvm==$release.* nvidia-cuda-cccl==$release.* nvidia-cuda-runtime==$release.*"
  else
    echo "nvidia-cuda-nvcc-cu$major==$release.* nvidia-cuda-cccl-cu$major==$release.* nvidia-cuda-runtime-cu$major==$release.*"
  fi
}

if [ "$BUILD" = cpu ]; then
  # ME is compiled against torch's C++ ABI: one cache slot per torch version.
  WHEEL_DIR="$CACHE_DIR/wheels/torch-$TORCH_VERSION"
else
  CUDA_TAG="cu${TORCH_CUDA//./}"
  if [ -n "${SPARSE_MAE_CUDA_ARCHS:-}" ]; then
    ARCHS=$SPARSE_MAE_CUDA_ARCHS; ARCHS_WHY="SPARSE_MAE_CUDA_ARCHS"
  elif [ -n "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    ARCHS=$TORCH_CUDA_ARCH_LIST; ARCHS_WHY="TORCH_CUDA_ARCH_LIST"
  elif GPU_ARCHS=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' | sed '/^$/d' | sort -u | paste -sd';' -) \
       && [ -n "$GPU_ARCHS" ]; then
    ARCHS=$GPU_ARCHS; ARCHS_WHY="the GPUs nvidia-smi lists"
  else
    ARCHS=$DEFAULT_CUDA_ARCHS; ARCHS_WHY="default list, no GPU visible"
  fi
  WHEEL_DIR="$CACHE_DIR/wheels/torch-$TORCH_VERSION-$CUDA_TAG-$(archs_key "$ARCHS")"

  NVCC_CHOICE=${SPARSE_MAE_NVCC:-auto}
  SYSTEM_HOME=$(system_cuda_home)
  SYSTEM_RELEASE=""
  [ -n "$SYSTEM_HOME" ] && SYSTEM_RELEASE=$(nvcc_release "$SYSTEM_HOME/bin/nvcc")
  case "$NVCC_CHOICE" in
    auto)
      if [ -n "$SYSTEM_RELEASE" ] && [ "${SYSTEM_RELEASE%%.*}" = "${TORCH_CUDA%%.*}" ]; then
        NVCC_CHOICE=system; NVCC_WHY="system nvcc $SYSTEM_RELEASE matches torch's CUDA $TORCH_CUDA"
      elif [ -n "$SYSTEM_RELEASE" ]; then
        NVCC_CHOICE=pip; NVCC_WHY="system nvcc $SYSTEM_RELEASE at $SYSTEM_HOME does not match torch's CUDA $TORCH_CUDA (torch refuses another major version)"
      else
        NVCC_CHOICE=pip; NVCC_WHY="no complete system CUDA toolkit found (nvcc with cuda_runtime.h, cusparse.h, cublas_v2.h)"
      fi
      ;;
    system)
      [ -n "$SYSTEM_RELEASE" ] || die "SPARSE_MAE_NVCC=system but no complete CUDA toolkit was found (nvcc with cuda_runtime.h, cusparse.h, cublas_v2.h; set CUDA_HOME, or put nvcc on PATH)."
      [ "${SYSTEM_RELEASE%%.*}" = "${TORCH_CUDA%%.*}" ] \
        || die "system nvcc $SYSTEM_RELEASE at $SYSTEM_HOME does not match torch's CUDA $TORCH_CUDA; use SPARSE_MAE_NVCC=pip (NVIDIA's wheels) or a CUDA ${TORCH_CUDA%%.*} toolkit."
      NVCC_WHY="SPARSE_MAE_NVCC=system"
      ;;
    pip) NVCC_WHY="SPARSE_MAE_NVCC=pip" ;;
    *) die "SPARSE_MAE_NVCC must be auto, system or pip (got '$NVCC_CHOICE')." ;;
  esac
fi

# -- is there anything to do? ----------------------------------------------------------

# The same collections shim as sparse_mae/backends/minkowski_compat.py, inlined so this
# check does not depend on the project package being installed. For the CUDA build the
# ME in $VENV must also have been compiled with CUDA (a CPU-only ME imports fine there).
me_imports() {
  "$PY" - "$BUILD" <<'EOF' >/dev/null 2>&1
import collections, collections.abc, sys, warnings
for name in ("Sequence", "Iterable", "Mapping"):
    if not hasattr(collections, name):
        setattr(collections, name, getattr(collections.abc, name))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import MinkowskiEngine
sys.exit(sys.argv[1] == "cuda" and not MinkowskiEngine.is_cuda_available())
EOF
}

find_cached_wheel() {
  ls "$WHEEL_DIR"/MinkowskiEngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n 1 || true
}

if [ "$PRINT_PLAN" = 1 ]; then
  plan torch "$TORCH_INSTALLED"
  plan torch_cuda "$TORCH_CUDA"
  plan build "$BUILD"
  plan wheel_dir "$WHEEL_DIR"
  if [ "$BUILD" = cuda ]; then
    plan cuda_archs "$ARCHS"
    plan cuda_archs_from "$ARCHS_WHY"
    plan nvcc "$NVCC_CHOICE"
    plan nvcc_why "$NVCC_WHY"
    if [ "$NVCC_CHOICE" = system ]; then
      plan cuda_home "$SYSTEM_HOME"
    else
      plan nvcc_wheels "$(pip_toolchain_requirements "$TORCH_CUDA")"
    fi
    plan patches "$(cd "$PATCH_DIR" && ls *.patch | paste -sd' ' -)"
  fi
  if me_imports; then
    plan action none
  elif [ -n "$(find_cached_wheel)" ]; then
    plan action install-cached
  else
    plan action build
  fi
  exit 0
fi

# -- building --------------------------------------------------------------------------

require_build_tools() {
  command -v g++ >/dev/null || die "g++ is missing; install a C++ compiler (Debian: apt-get install -y g++)."
  "$PY" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    || die "Python.h is missing for $("$PY" -V); install the Python development headers."

  if ! dpkg -s libopenblas-dev >/dev/null 2>&1; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing Debian libopenblas-dev (ME links against a system BLAS)"
    $sudo apt-get install -y libopenblas-dev >/dev/null \
      || { $sudo apt-get update >/dev/null && $sudo apt-get install -y libopenblas-dev >/dev/null; } \
      || die "libopenblas-dev is missing and could not be installed; run 'apt-get install -y libopenblas-dev' as root."
  fi
}

# pip for the CUDA build of torch: a pip set-up whose config holds a local folder of CPU
# wheels (find-links) would otherwise pick the CPU build of the same version.
pip_without_config() { env -u PIP_FIND_LINKS -u PIP_NO_INDEX -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$@"; }

# torch==$TORCH_VERSION as a CUDA build into the venv whose python is $1.
install_cuda_torch() {
  local py=$1
  "$py" -m pip install --quiet "torch==$TORCH_VERSION" || die "could not install torch==$TORCH_VERSION into $py's venv."
  if [ "$("$py" -c 'import torch; print(torch.version.cuda or "none")' 2>/dev/null)" = none ]; then
    log "pip's configuration gave the CPU build of torch; fetching the CUDA build with pip's config files and find-links off"
    "$py" -m pip uninstall --quiet -y torch
    pip_without_config "$py" -m pip install --quiet "torch==$TORCH_VERSION" \
      || die "could not install the CUDA build of torch==$TORCH_VERSION from the package registry."
  fi
  local got
  got=$("$py" -c 'import torch; print(torch.version.cuda or "none")' 2>/dev/null || echo none)
  [ "$got" = "$TORCH_CUDA" ] \
    || die "the build venv got torch with CUDA '$got', but $VENV's torch has CUDA $TORCH_CUDA; install the same torch build in both."
}

# The ME sdist, downloaded once into $SDIST_DIR (pip runs its setup.py for metadata,
# which imports torch and numpy<2: the build venv has both). ME's setup.py also runs
# `pip uninstall MinkowskiEngine -y` with whatever pip is first on PATH, so the build
# venv's bin/ goes first: it must never reach the project venv's ME.
fetch_sdist() {
  local py=$1 tarball="$SDIST_DIR/MinkowskiEngine-$ME_VERSION.tar.gz"
  if [ ! -f "$tarball" ]; then
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/sparse-mae-me-sdist.XXXXXX")
    PATH="$(dirname "$py"):$PATH" "$py" -m pip download --quiet --no-deps --no-binary :all: --no-build-isolation \
      -d "$tmp" "MinkowskiEngine==$ME_VERSION" \
      || { rm -rf "$tmp"; die "could not download the MinkowskiEngine==$ME_VERSION sdist from PyPI."; }
    mkdir -p "$SDIST_DIR"
    cp "$tmp/MinkowskiEngine-$ME_VERSION.tar.gz" "$SDIST_DIR/.partial.tar.gz"
    mv "$SDIST_DIR/.partial.tar.gz" "$tarball"
    rm -rf "$tmp"
  fi
  echo "$tarball"
}

apply_patches() {
  local source_dir=$1 patch_file
  command -v patch >/dev/null || die "'patch' is missing; install it (Debian: apt-get install -y patch)."
  for patch_file in "$PATCH_DIR"/*.patch; do
    log "applying $(basename "$patch_file")"
    patch -d "$source_dir" -p1 --forward --fuzz=0 --quiet <"$patch_file" \
      || die "$(basename "$patch_file") does not apply to the MinkowskiEngine $ME_VERSION sdist."
  done
}

# First compiler error of a build log, with its file and line, for the report.
first_error() {
  grep -m 1 -E '(error|Error)( [A-Z0-9#-]+)?:|: error|fatal error|undefined reference|cannot find -l' "$1" || true
}

cache_wheel() {
  local built=$1
  mkdir -p "$WHEEL_DIR"
  # Copy then rename, so a concurrent or interrupted run never sees a half-written wheel.
  cp "$built" "$WHEEL_DIR/.partial.whl"
  mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$built")"
  log "cached $WHEEL_DIR/$(basename "$built")"
}

build_wheel_cpu() {
  log "no cached wheel in $WHEEL_DIR; building MinkowskiEngine $ME_VERSION (CPU, takes ~4 min on 2 cores)"
  require_build_tools
  local build_dir
  build_dir=$(mktemp -d "${TMPDIR:-/tmp}/sparse-mae-me-build.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the path is fixed
  trap "rm -rf '$build_dir'" EXIT
  log "build venv: $build_dir/venv"
  "$PY" -m venv "$build_dir/venv"
  local bpip="$build_dir/venv/bin/python -m pip"
  $bpip install --quiet "torch==$TORCH_VERSION" \
    || die "could not install torch==$TORCH_VERSION into the build venv."
  # --no-deps: torch itself asks for a newer setuptools than ME's setup.py tolerates.
  # wheel<0.46 still provides the bdist_wheel command for setuptools 59.
  $bpip install --quiet --no-deps "numpy<2" "setuptools==59.8.0" "wheel<0.46" \
    || die "could not install the build pins (numpy<2, setuptools==59.8.0, wheel<0.46)."
  local tarball
  tarball=$(fetch_sdist "$build_dir/venv/bin/python")
  tar -xzf "$tarball" -C "$build_dir"
  # Without CUDA, ME's setup.py selects CPU_ONLY by itself and finds OpenBLAS via numpy.
  if ! (cd "$build_dir/MinkowskiEngine-$ME_VERSION" && export PATH="$build_dir/venv/bin:$PATH" \
        && "$build_dir/venv/bin/python" setup.py bdist_wheel >"$build_dir/build.log" 2>&1); then
    tail -n 40 "$build_dir/build.log" >&2
    die "building MinkowskiEngine failed (log above). It needs g++, Python headers, libopenblas-dev, numpy<2 and setuptools==59.8.0."
  fi
  cache_wheel "$(ls "$build_dir/MinkowskiEngine-$ME_VERSION"/dist/*.whl | head -n 1)"
}

build_wheel_cuda() {
  log "no cached wheel in $WHEEL_DIR; building MinkowskiEngine $ME_VERSION with CUDA $TORCH_CUDA for $ARCHS ($ARCHS_WHY); nvcc: $NVCC_CHOICE ($NVCC_WHY). Slow: tens of minutes per architecture on few cores."
  require_build_tools
  local build_dir
  build_dir=${SPARSE_MAE_ME_BUILD_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sparse-mae-me-build.XXXXXX")}
  mkdir -p "$build_dir"
  if [ "${SPARSE_MAE_KEEP_BUILD_DIR:-0}" != 1 ]; then
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$build_dir'" EXIT
  fi
  log "build venv: $build_dir/venv"
  "$PY" -m venv "$build_dir/venv"
  local bpy="$build_dir/venv/bin/python"
  "$bpy" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  install_cuda_torch "$bpy"
  $bpy -m pip install --quiet --no-deps "numpy<2" "setuptools==59.8.0" "wheel<0.46" \
    || die "could not install the build pins (numpy<2, setuptools==59.8.0, wheel<0.46)."

  local cuda_home
  if [ "$NVCC_CHOICE" = system ]; then
    cuda_home=$SYSTEM_HOME
  else
    local requirements
    read -r -a requirements <<<"$(pip_toolchain_requirements "$TORCH_CUDA")"
    log "installing nvcc, CCCL and CUDA runtime headers from NVIDIA's wheels: ${requirements[*]}"
    "$bpy" -m pip install --quiet "${requirements[@]}" \
      || die "could not install ${requirements[*]} from the package registry."
    cuda_home="$build_dir/cuda-home"
    local site
    site=$("$bpy" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$bpy" tools/cuda_home_from_wheels.py "$site" "$cuda_home" \
      || die "the NVIDIA wheels in $site do not make a complete CUDA toolkit (above)."
  fi
  log "CUDA_HOME=$cuda_home ($(nvcc_release "$cuda_home/bin/nvcc"))"

  local tarball
  tarball=$(fetch_sdist "$bpy")
  tar -xzf "$tarball" -C "$build_dir"
  local source_dir="$build_dir/MinkowskiEngine-$ME_VERSION"
  apply_patches "$source_dir"

  local started=$SECONDS
  log "compiling (log: $build_dir/build.log)"
  # --force_cuda: a machine without a GPU (the compile check) still builds the CUDA variant.
  if ! (cd "$source_dir" \
        && PATH="$cuda_home/bin:$build_dir/venv/bin:$PATH" CUDA_HOME="$cuda_home" TORCH_CUDA_ARCH_LIST="$ARCHS" \
           MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$bpy" setup.py bdist_wheel --force_cuda >"$build_dir/build.log" 2>&1); then
    tail -n 40 "$build_dir/build.log" >&2
    log "first error: $(first_error "$build_dir/build.log")"
    die "building MinkowskiEngine with CUDA failed after $((SECONDS - started)) s (log above; full log $build_dir/build.log). See docs/minkowski.md."
  fi
  log "compiled in $((SECONDS - started)) s"
  cache_wheel "$(ls "$source_dir"/dist/*.whl | head -n 1)"
}

# --fetch-sdist: only make sure the sdist is in the cache (the patch tests use it), and
# print its path. ME's setup.py needs torch and numpy<2 to say its metadata: a small venv
# sees $VENV's torch through a .pth file, with numpy<2 and setuptools 59 of its own.
if [ "$FETCH_SDIST" = 1 ]; then
  tarball="$SDIST_DIR/MinkowskiEngine-$ME_VERSION.tar.gz"
  if [ ! -f "$tarball" ]; then
    meta_dir=$(mktemp -d "${TMPDIR:-/tmp}/sparse-mae-me-meta.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the path is fixed
    trap "rm -rf '$meta_dir'" EXIT
    "$PY" -m venv "$meta_dir/venv"
    purelib() { "$1" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }
    purelib "$PY" >"$(purelib "$meta_dir/venv/bin/python")/sparse-mae-project-venv.pth"
    "$meta_dir/venv/bin/python" -m pip install --quiet --no-deps "numpy<2" "setuptools==59.8.0" "wheel<0.46" \
      || die "could not install numpy<2, setuptools==59.8.0, wheel<0.46 to read the sdist's metadata."
    fetch_sdist "$meta_dir/venv/bin/python" >/dev/null
  fi
  echo "$tarball"
  exit 0
fi

if me_imports; then
  log "MinkowskiEngine ($BUILD build) already importable in $VENV; nothing to do."
  exit 0
fi

wheel=$(find_cached_wheel)
if [ -z "$wheel" ]; then
  "build_wheel_$BUILD"
  wheel=$(find_cached_wheel)
fi
log "installing $wheel into $VENV"
# --no-deps: the wheel declares plain 'torch', which must not pull another torch build.
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
me_imports || die "MinkowskiEngine was installed from $wheel but does not import in $VENV (or is not a $BUILD build); delete $WHEEL_DIR to force a rebuild."
log "done"
