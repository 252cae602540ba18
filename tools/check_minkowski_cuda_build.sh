#!/usr/bin/env bash
# Compile check for the CUDA build of MinkowskiEngine, runnable on a machine without a GPU.
#
#   MAX_JOBS=2 bash tools/check_minkowski_cuda_build.sh
#
# In a throw-away venv it installs the CUDA build of torch==$TORCH_VERSION, then runs
# tools/install_minkowski.sh exactly as a CUDA machine would, except that nvcc, CCCL and
# the runtime headers always come from NVIDIA's pip wheels (SPARSE_MAE_NVCC=pip) and the
# architectures default to 8.0;9.0. It reports the wheel it built and that the wheel
# imports with CUDA compiled in, or the first compiler error. Slow (about an hour on 2
# cores, mostly nvcc) and a few GB of downloads on the first run; not part of make test.
#
# Nothing outside the throw-away directory changes, except that the ME sdist is cached
# in ${SPARSE_MAE_CACHE:-~/.cache/sparse-mae}/sdist. The directory (build log, wheel)
# is kept and printed at the end; delete it when done.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CACHE_DIR=${SPARSE_MAE_CACHE:-$HOME/.cache/sparse-mae}
PYTHON=${PYTHON:-python3}
WORK=${SPARSE_MAE_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/sparse-mae-me-cuda-check.XXXXXX")}
started=$SECONDS

log() { echo "[check-cuda-build] $*" >&2; }
finish() {
  local status=$1 message=$2
  log "$message"
  log "result: $status after $((SECONDS - started)) s; work directory $WORK"
  [ "$status" = success ]
}

mkdir -p "$WORK/cache/sdist"
# Share the sdist with the real cache; keep built wheels apart from it.
if [ -f "$CACHE_DIR/sdist/MinkowskiEngine-0.5.4.tar.gz" ]; then
  cp "$CACHE_DIR/sdist/MinkowskiEngine-0.5.4.tar.gz" "$WORK/cache/sdist/"
fi

log "throw-away venv with the CUDA build of torch==$TORCH_VERSION: $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
# The CUDA build comes from the registry with pip's config files and find-links off
# (a local folder of CPU wheels would win otherwise).
# numpy too: ME imports it (in the project venv it comes with the package).
if ! env -u PIP_FIND_LINKS -u PIP_NO_INDEX PIP_CONFIG_FILE=/dev/null \
     "$WORK/venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION" numpy >"$WORK/torch-install.log" 2>&1; then
  tail -n 20 "$WORK/torch-install.log" >&2
  finish failure "could not install the CUDA build of torch==$TORCH_VERSION (log above)"
  exit 1
fi
torch_cuda=$("$WORK/venv/bin/python" -c "import torch; print(torch.version.cuda or 'none')")
if [ "$torch_cuda" = none ]; then
  finish failure "torch==$TORCH_VERSION from the registry is a CPU build; nothing to check"
  exit 1
fi
log "torch $("$WORK/venv/bin/python" -c 'import torch; print(torch.__version__)') (CUDA $torch_cuda)"

status=0
VENV="$WORK/venv" SPARSE_MAE_CACHE="$WORK/cache" SPARSE_MAE_NVCC=pip SPARSE_MAE_MINKOWSKI_BUILD=cuda \
  SPARSE_MAE_CUDA_ARCHS="${SPARSE_MAE_CUDA_ARCHS:-8.0;9.0}" SPARSE_MAE_ME_BUILD_DIR="$WORK/build" \
  SPARSE_MAE_KEEP_BUILD_DIR=1 TORCH_VERSION="$TORCH_VERSION" MAX_JOBS="${MAX_JOBS:-2}" \
  bash tools/install_minkowski.sh || status=$?
[ -f "$WORK/cache/sdist/MinkowskiEngine-0.5.4.tar.gz" ] && [ ! -f "$CACHE_DIR/sdist/MinkowskiEngine-0.5.4.tar.gz" ] \
  && mkdir -p "$CACHE_DIR/sdist" && cp "$WORK/cache/sdist/MinkowskiEngine-0.5.4.tar.gz" "$CACHE_DIR/sdist/"
if [ "$status" != 0 ]; then
  finish failure "the CUDA build of MinkowskiEngine failed; the first error is printed above ('first error:'), full log $WORK/build/build.log"
  exit 1
fi

wheel=$(ls "$WORK"/cache/wheels/*/MinkowskiEngine-*.whl | head -n 1)
report=$("$WORK/venv/bin/python" - <<'EOF'
import collections, collections.abc, warnings
for name in ("Sequence", "Iterable", "Mapping"):
    if not hasattr(collections, name):
        setattr(collections, name, getattr(collections.abc, name))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import MinkowskiEngine as ME
import torch
print(f"MinkowskiEngine {ME.__version__}: is_cuda_available()={ME.is_cuda_available()}, "
      f"cuda_version()={ME.cuda_version()}, torch {torch.__version__}, GPU present: {torch.cuda.is_available()}")
EOF
)
log "$report"
finish success "built $wheel"
