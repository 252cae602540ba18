#!/usr/bin/env bash
# Installs MinkowskiEngine 0.5.4 (CPU build) into the project venv; safe to run again.
#
# Upstream ME only ships an sdist that no longer builds with a current toolchain, so we
# build it once in a throw-away venv with the old pins it needs (numpy<2 for
# numpy.distutils' BLAS lookup, setuptools 59.8 for its setup.py), cache the wheel
# outside the repo, and install that wheel into $VENV. Later runs reuse the cache, and
# do nothing at all when ME already imports in $VENV. See DESIGN.md section 4.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
ME_VERSION=0.5.4
CACHE_DIR=${SPARSE_MAE_CACHE:-$HOME/.cache/sparse-mae}
# ME is compiled against torch's C++ ABI: one cache slot per torch version.
WHEEL_DIR="$CACHE_DIR/wheels/torch-$TORCH_VERSION"
PY="$VENV/bin/python"

log() { echo "[minkowski] $*"; }
die() { echo "[minkowski] ERROR: $*" >&2; exit 1; }

[ -x "$PY" ] || die "$PY not found; run 'bash tools/setup_env.sh' (or 'make setup') first."

# The same collections shim as sparse_mae/backends/minkowski_compat.py, inlined so this
# check does not depend on the project package being installed.
me_imports() {
  "$PY" - <<'EOF' >/dev/null 2>&1
import collections, collections.abc
for name in ("Sequence", "Iterable", "Mapping"):
    if not hasattr(collections, name):
        setattr(collections, name, getattr(collections.abc, name))
import MinkowskiEngine
EOF
}

if me_imports; then
  log "MinkowskiEngine already importable in $VENV; nothing to do."
  exit 0
fi

find_cached_wheel() {
  ls "$WHEEL_DIR"/MinkowskiEngine-"$ME_VERSION"-*.whl 2>/dev/null | head -n 1 || true
}

build_wheel() {
  log "no cached wheel in $WHEEL_DIR; building MinkowskiEngine $ME_VERSION (CPU, takes ~4 min on 2 cores)"
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
  $bpip download --quiet --no-deps --no-binary :all: --no-build-isolation \
    -d "$build_dir/sdist" "MinkowskiEngine==$ME_VERSION" \
    || die "could not download the MinkowskiEngine==$ME_VERSION sdist from PyPI."
  tar -xzf "$build_dir"/sdist/MinkowskiEngine-"$ME_VERSION".tar.gz -C "$build_dir"
  # Without CUDA, ME's setup.py selects CPU_ONLY by itself and finds OpenBLAS via numpy.
  if ! (cd "$build_dir/MinkowskiEngine-$ME_VERSION" \
        && "$build_dir/venv/bin/python" setup.py bdist_wheel >"$build_dir/build.log" 2>&1); then
    tail -n 40 "$build_dir/build.log" >&2
    die "building MinkowskiEngine failed (log above). It needs g++, Python headers, libopenblas-dev, numpy<2 and setuptools==59.8.0."
  fi
  mkdir -p "$WHEEL_DIR"
  local built
  built=$(ls "$build_dir/MinkowskiEngine-$ME_VERSION"/dist/*.whl | head -n 1)
  # Copy then rename, so a concurrent or interrupted run never sees a half-written wheel.
  cp "$built" "$WHEEL_DIR/.partial.whl"
  mv "$WHEEL_DIR/.partial.whl" "$WHEEL_DIR/$(basename "$built")"
  log "cached $WHEEL_DIR/$(basename "$built")"
}

wheel=$(find_cached_wheel)
if [ -z "$wheel" ]; then
  build_wheel
  wheel=$(find_cached_wheel)
fi
log "installing $wheel into $VENV"
# --no-deps: the wheel declares plain 'torch', which must not pull another torch build.
"$PY" -m pip install --quiet --no-deps --force-reinstall "$wheel"
me_imports || die "MinkowskiEngine was installed from $wheel but does not import in $VENV; delete $WHEEL_DIR to force a rebuild."
log "done"
