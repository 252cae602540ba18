#!/usr/bin/env bash
# Creates the side venv in which tests/test_timm_loads_exports.py loads our exports with real
# timm (tools/timm_check.py); safe to run again, and quick then (a stamp holds the pins).
#
#   bash tools/timm_env.sh              # .venv-timm in the repository root
#   TIMM_VENV=/path bash tools/timm_env.sh
#
# timm needs torchvision, whose registry build does not import beside the project's CPU
# torch, so timm lives in a venv of its own: torch 2.14.1 and torchvision 0.29.1 are the
# pair this machine's pip serves from local disk (its wheel store), timm 1.0.31 the release
# the layout manifests were read off (docs/design.md section 5).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TIMM_VENV:-.venv-timm}
PYTHON=${PYTHON:-python3}
PINS=("torch==2.14.1" "torchvision==0.29.1" "timm==1.0.31")
STAMP="$VENV/.timm-env-stamp"

die() { echo "[timm-env] ERROR: $*" >&2; exit 1; }

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ]; then
  exit 0  # already built with these pins
fi
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[timm-env] creating $VENV"
  "$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
echo "[timm-env] installing ${PINS[*]} into $VENV (a few minutes the first time)"
"$VENV/bin/python" -m pip install --quiet "${PINS[@]}" \
  || die "pip could not install ${PINS[*]} into $VENV (see pip's message above); remove $VENV and run again once pip can reach those releases"
"$VENV/bin/python" -c "import timm, torchvision" \
  || die "timm installed into $VENV but does not import (see above); remove $VENV and run again"
echo "${PINS[*]}" > "$STAMP"
echo "[timm-env] done: $VENV"
