#!/usr/bin/env bash
# Creates .venv and installs everything the project needs; safe to run again.
#
#   bash tools/setup_env.sh               # what `make setup` runs
#   bash tools/setup_env.sh --print-plan  # say which torch build it would pick, change nothing
#
# The torch build follows the machine: the CPU build where there is no NVIDIA driver
# (nvidia-smi missing or listing no GPU), the CUDA build of the same version where there
# is one. SPARSE_MAE_TORCH=cpu|cuda picks one explicitly (default: auto).
# torch is pinned first so pip takes the local CPU wheel instead of the CUDA build.
# torchvision (nvjpeg decode for data.decode=gpu) is installed only with a CUDA torch: the
# registry's torchvision 0.28.0 is the CUDA build for torch 2.13.0 and does not import with the CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}  # the release made for torch $TORCH_VERSION
PYTHON=${PYTHON:-python3}

PRINT_PLAN=0
case "${1:-}" in
  --print-plan) PRINT_PLAN=1 ;;
  "") ;;
  *) echo "usage: bash tools/setup_env.sh [--print-plan]" >&2; exit 2 ;;
esac

die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# -- which torch build ------------------------------------------------------------------

TORCH_BUILD=${SPARSE_MAE_TORCH:-auto}
case "$TORCH_BUILD" in
  auto)
    if GPUS=$(nvidia-smi -L 2>/dev/null) && echo "$GPUS" | grep -q '^GPU '; then
      TORCH_BUILD=cuda; TORCH_WHY="NVIDIA driver found: $(echo "$GPUS" | grep -c '^GPU ') GPU(s) listed by nvidia-smi"
    else
      TORCH_BUILD=cpu; TORCH_WHY="no NVIDIA driver (nvidia-smi missing or lists no GPU)"
    fi
    ;;
  cpu|cuda) TORCH_WHY="SPARSE_MAE_TORCH=$TORCH_BUILD" ;;
  *) die "SPARSE_MAE_TORCH must be auto, cpu or cuda (got '$TORCH_BUILD')." ;;
esac

# "<version> <cuda version or none>" of the torch in $VENV, or nothing.
installed_torch() {
  [ -x "$VENV/bin/python" ] || return 0
  "$VENV/bin/python" -c "import torch; print(torch.__version__, torch.version.cuda or 'none')" 2>/dev/null || true
}

# What to do with torch: keep, install, or reinstall (the version fits but not the build).
torch_action() {
  local facts version cuda
  facts=$(installed_torch)
  [ -n "$facts" ] || { echo install; return; }
  version=${facts% *}; cuda=${facts#* }
  [ "${version%%+*}" = "$TORCH_VERSION" ] || { echo install; return; }
  if [ "$TORCH_BUILD" = cuda ] && [ "$cuda" = none ]; then
    echo reinstall
  elif [ "$TORCH_BUILD" = cpu ] && [ "$cuda" != none ] && [ -n "${SPARSE_MAE_TORCH:-}" ] && [ "$SPARSE_MAE_TORCH" != auto ]; then
    # Only on request: on registries without a CPU build the CUDA build is all there is,
    # and it runs on a CPU too.
    echo reinstall
  else
    echo keep
  fi
}

# The build (cpu or cuda) of the torch .venv ends up with: a kept torch keeps its own build.
final_torch_build() {
  if [ "$(torch_action)" = keep ] && [ "$(installed_torch | cut -d' ' -f2)" != none ]; then
    echo cuda
  elif [ "$(torch_action)" = keep ]; then
    echo cpu
  else
    echo "$TORCH_BUILD"
  fi
}

if [ "$PRINT_PLAN" = 1 ]; then
  echo "torch_build=$TORCH_BUILD"
  echo "torch_build_why=$TORCH_WHY"
  echo "torch_version=$TORCH_VERSION"
  echo "torch_action=$(torch_action)"
  if [ "$TORCH_BUILD" = cuda ]; then
    echo "torch_pip=pip install torch==$TORCH_VERSION; if that gives the CPU build, again with pip's config files and find-links off"
  else
    echo "torch_pip=pip install torch==$TORCH_VERSION"
  fi
  # ME and torchvision follow the torch that .venv will have.
  echo "minkowski_build=$(final_torch_build)"
  if [ "$(final_torch_build)" = cuda ]; then
    echo "torchvision=pip install torchvision==$TORCHVISION_VERSION (nvjpeg for data.decode=gpu)"
  else
    echo "torchvision=none (the registry's torchvision is a CUDA build; data.decode=gpu needs a CUDA machine)"
  fi
  exit 0
fi

# -- set-up -----------------------------------------------------------------------------

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip

# pip with its config files and find-links off: on machines whose pip set-up holds a
# local folder of CPU wheels, that is the only way to get the registry's CUDA build.
pip_without_config() { env -u PIP_FIND_LINKS -u PIP_NO_INDEX -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null "$@"; }

case "$(torch_action)" in
  keep) ;;
  install)
    echo "[setup] installing torch==$TORCH_VERSION ($TORCH_BUILD build: $TORCH_WHY)"
    $PIP install --quiet "torch==$TORCH_VERSION"
    ;;
  reinstall)
    echo "[setup] replacing $VENV's torch with the $TORCH_BUILD build of torch==$TORCH_VERSION ($TORCH_WHY)"
    $PIP uninstall --quiet -y torch
    $PIP install --quiet "torch==$TORCH_VERSION"
    ;;
esac
if [ "$TORCH_BUILD" = cuda ] && [ "$(installed_torch | cut -d' ' -f2)" = none ]; then
  echo "[setup] pip's configuration gave the CPU build of torch; fetching the CUDA build with pip's config files and find-links off"
  $PIP uninstall --quiet -y torch
  pip_without_config $PIP install --quiet "torch==$TORCH_VERSION" \
    || die "could not install the CUDA build of torch==$TORCH_VERSION from the package registry; SPARSE_MAE_TORCH=cpu sets up the CPU build."
  [ "$(installed_torch | cut -d' ' -f2)" != none ] \
    || die "pip installed a CPU build of torch==$TORCH_VERSION although the CUDA build was asked for; SPARSE_MAE_TORCH=cpu sets up the CPU build."
fi
if [ "$TORCH_BUILD" = cpu ] && [ "$(installed_torch | cut -d' ' -f2)" != none ]; then
  echo "[setup] note: pip gave torch $(installed_torch | cut -d' ' -f1), a CUDA build (the registry has no CPU build of it); it runs on the CPU as well."
fi
if [ "$(installed_torch | cut -d' ' -f2)" != none ]; then
  echo "[setup] installing torchvision==$TORCHVISION_VERSION (nvjpeg decode for data.decode=gpu)"
  TV_PINS=("torchvision==$TORCHVISION_VERSION" "torch==$(installed_torch | cut -d' ' -f1)")
  $PIP install --quiet "${TV_PINS[@]}" || pip_without_config $PIP install --quiet "${TV_PINS[@]}" \
    || die "could not install torchvision==$TORCHVISION_VERSION for the CUDA torch; data.decode=gpu needs it (data.decode=cpu does not)."
fi
echo "[setup] installing sparse-mae (editable) with test extras"
$PIP install --quiet -e ".[test]"
# MinkowskiEngine is a project dependency (the faithful sparse baseline): a failed install
# fails the set-up, so `make test` / CI never pass with its tests silently skipped. Where it
# cannot be built, SPARSE_MAE_WITHOUT_MINKOWSKI=1 goes on without it (backend='minkowski'
# is then unavailable and its tests skip; everything else works). Its build (CPU or CUDA)
# follows the torch just installed.
if ! VENV="$VENV" bash tools/install_minkowski.sh; then
  if [ "${SPARSE_MAE_WITHOUT_MINKOWSKI:-0}" = "1" ]; then
    echo "[setup] MinkowskiEngine not installed (see above); going on without it (SPARSE_MAE_WITHOUT_MINKOWSKI=1)"
  else
    echo "[setup] ERROR: MinkowskiEngine could not be installed (see above). Fix the cause, or run again with" >&2
    echo "[setup]        SPARSE_MAE_WITHOUT_MINKOWSKI=1 to set up everything else without backend='minkowski'." >&2
    exit 1
  fi
fi
echo "[setup] done"
