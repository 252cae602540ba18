#!/usr/bin/env bash
# Creates .venv and installs everything the project needs; safe to run again.
# torch is pinned first so pip takes the local CPU wheel instead of the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install --quiet --upgrade pip
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  $PIP install --quiet "torch==$TORCH_VERSION"
fi
echo "[setup] installing sparse-mae (editable) with test extras"
$PIP install --quiet -e ".[test]"
# MinkowskiEngine is a project dependency (the faithful sparse baseline): a failed install
# fails the set-up, so `make test` / CI never pass with its tests silently skipped. Where it
# cannot be built, SPARSE_MAE_WITHOUT_MINKOWSKI=1 goes on without it (backend='minkowski'
# is then unavailable and its tests skip; everything else works).
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
