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
VENV="$VENV" bash tools/install_minkowski.sh || echo "[setup] WARNING: MinkowskiEngine not installed (see above); backend='minkowski' is unavailable, everything else works"
echo "[setup] done"
