#!/usr/bin/env bash
# Freezes the appliance into one executable: dist/appliance (cpu) or dist/appliance-cuda (cuda).
#
#   build/build.sh [cpu|cuda]        (`make binary`, `make binary-cuda`)
#
# Environment:
#   MODEL=path.gguf        model to embed (default var/models/demo.gguf; MODEL= embeds none)
#   MODEL_NAME=name        name it is served under (default: the file's stem)
#   APPLIANCE_CACHE        where scripts/llama-wheel.sh caches the compiled llama-cpp-python wheel
#   CUDACXX                cuda: the nvcc to use (default: the pinned toolkit of build/requirements-cuda.lock)
#   CUDA_ARCHS             cuda: CMAKE_CUDA_ARCHITECTURES (default 80-real;86-real;89-real;90-real;90-virtual)
#   PYTHON                 interpreter for the build venv (default python3; pin it for reproducible output)
#   SELFTEST=0             skip the self-test (done by default where the variant can run)
#   COMPRESS_BINARIES=1    deflate the shared libraries in the archive: 63 MB smaller, ~0.3 s slower start
#   DIST, WORK             output and scratch directories (default dist/, build/work/<variant>/)
#
# Reproducibility: the build venv is made fresh from requirements.lock + build/requirements-build.lock
# (hashes required) and the llama wheel; PyInstaller runs in a fresh process with --clean, a fixed
# PYTHONHASHSEED, SOURCE_DATE_EPOCH (the commit's time), its own config/cache dir, UTC and C locale.
set -euo pipefail

VARIANT=${1:-cpu}
case "$VARIANT" in
  cpu) NAME=appliance ;;
  cuda) NAME=appliance-cuda ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DIST=${DIST:-$ROOT/dist}
WORK=${WORK:-$ROOT/build/work/$VARIANT}
VENV=$WORK/venv
MODEL=${MODEL-var/models/demo.gguf}
MODEL_NAME=${MODEL_NAME:-}
export APPLIANCE_CACHE=${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}
PIP=(--disable-pip-version-check -q)
quiet_pip() { grep -v 'is ignored' >&2 || true; }  # the machine's extra local indexes warn per package
log() { printf '\033[1mbuild:\033[0m %s\n' "$*" >&2; }

umask 022
export APPLIANCE_COMPRESS_BINARIES=${COMPRESS_BINARIES:-0}
export TZ=UTC LC_ALL=C.UTF-8 PYTHONHASHSEED=0 PYTHONDONTWRITEBYTECODE=1
unset PYTHONPATH PYTHONSTARTUP PYTHONOPTIMIZE PYINSTALLER_COMPILE_BOOTLOADER

if [[ -n $MODEL && ! -f $MODEL ]]; then
  echo "build: model $MODEL not found (make demo-model, or MODEL=path.gguf, or MODEL= for none)" >&2
  exit 2
fi

# --- source identity ------------------------------------------------------------------------------
if [[ -z ${APPLIANCE_SOURCE_COMMIT:-} ]] && git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
  APPLIANCE_SOURCE_COMMIT=$(git -C "$ROOT" rev-parse HEAD)
  if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=normal 2>/dev/null) ]]; then
    APPLIANCE_SOURCE_DIRTY=1
  fi
  : "${SOURCE_DATE_EPOCH:=$(git -C "$ROOT" log -1 --format=%ct HEAD)}"
fi
export APPLIANCE_SOURCE_COMMIT=${APPLIANCE_SOURCE_COMMIT:-unknown}
export APPLIANCE_SOURCE_DIRTY=${APPLIANCE_SOURCE_DIRTY:-0}
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

# --- CUDA: the pinned toolkit (or CUDACXX's), checked before the long compile ----------------------
if [[ $VARIANT == cuda ]]; then
  if [[ -z ${CUDACXX:-} ]]; then
    log "CUDA toolkit: pinned wheels from build/requirements-cuda.lock"
    TK=$(PYTHON="$PY" scripts/cuda-toolkit.sh)
    export CUDACXX=$TK/bin/nvcc CUDAToolkit_ROOT=$TK
  fi
  CUDA_INC=$("$CUDACXX" -v --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ INCLUDES="-I\([^"]*\)".*/\1/p' | head -1)
  CUDA_INC=${CUDA_INC%% *}
  if [[ ! -f $CUDA_INC/cublas_v2.h ]]; then
    echo "build: nvcc $("$CUDACXX" --version | grep -o 'release [0-9.]*'): no cuBLAS headers in ${CUDA_INC:-the toolkit}; ggml-cuda links cuBLAS" >&2
    echo "       (unset CUDACXX to use the pinned toolkit, or install the toolkit's cublas dev package)" >&2
    exit 2
  fi
  log "CUDA toolkit: nvcc $("$CUDACXX" --version | grep -o 'release [0-9.]*'), architectures ${CUDA_ARCHS:-80-real;86-real;89-real;90-real;90-virtual}"
fi

# --- llama.cpp, compiled once per flag set (and anew in an empty APPLIANCE_CACHE) -----------------
log "llama-cpp-python wheel ($VARIANT)"
# Only the cache key (version, variant, flags) decides which wheel; its libraries are reproducible.
WHEEL=$(env -u SOURCE_DATE_EPOCH PYTHON="$PY" scripts/llama-wheel.sh "$VARIANT")
[[ -f $WHEEL ]] || { echo "build: no wheel from scripts/llama-wheel.sh $VARIANT" >&2; exit 1; }

# --- the build venv: runtime lock + the freezer, nothing else -------------------------------------
STAMP=$VENV/.appliance-build
WANT=$(cat requirements.lock build/requirements-build.lock "$WHEEL" | sha256sum | cut -c1-64)
if [[ ! -f $STAMP || $(cat "$STAMP") != "$WANT" ]]; then
  log "build venv $VENV"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install "${PIP[@]}" --require-hashes --no-deps \
    -r requirements.lock -r build/requirements-build.lock 2> >(quiet_pip)
  "$VENV/bin/python" -m pip install "${PIP[@]}" --no-deps "$WHEEL" 2> >(quiet_pip)
  echo "$WANT" >"$STAMP"
fi

# --- freeze ---------------------------------------------------------------------------------------
log "pyinstaller -> $DIST/$NAME"
mkdir -p "$DIST"
rm -f "$DIST/$NAME" "$DIST/$NAME.sha256" "$DIST/$NAME.manifest.json"
rm -rf "$WORK/pyinstaller" "$WORK/config"
start=$(date +%s)
APPLIANCE_VARIANT=$VARIANT APPLIANCE_BINARY_NAME=$NAME APPLIANCE_MODEL=$MODEL APPLIANCE_MODEL_NAME=$MODEL_NAME \
PYINSTALLER_CONFIG_DIR=$WORK/config \
  "$VENV/bin/python" -m PyInstaller --noconfirm --clean --log-level WARN \
    --workpath "$WORK/pyinstaller" --distpath "$DIST" build/appliance.spec
log "frozen in $(( $(date +%s) - start ))s"

# --- digest and manifest --------------------------------------------------------------------------
(cd "$DIST" && sha256sum "$NAME" >"$NAME.sha256")
"$VENV/bin/python" build/manifest.py --variant "$VARIANT" --binary "$DIST/$NAME" --wheel "$WHEEL" \
  --model "$MODEL" --model-name "$MODEL_NAME" >"$DIST/$NAME.manifest.json"
log "$(cat "$DIST/$NAME.sha256") ($(stat -c %s "$DIST/$NAME") bytes)"

# --- self-test: the frozen binary loads a model and generates -------------------------------------
if [[ ${SELFTEST:-1} == 0 ]]; then
  log "self-test skipped (SELFTEST=0)"
else
  SELFTEST_ARGS=()
  [[ -z $MODEL ]] && SELFTEST_ARGS=(--model "var/models/demo.gguf")
  if [[ $VARIANT == cuda ]]; then
    if nvidia-smi -L >/dev/null 2>&1; then
      SELFTEST_ARGS+=(--expect-device gpu)
    else
      # ggml-cuda is a loadable module: without the NVIDIA driver it is skipped and the CPU serves.
      log "no NVIDIA GPU here: self-testing the CUDA binary's CPU fallback"
    fi
  fi
  "$VENV/bin/python" build/selftest.py "$DIST/$NAME" "${SELFTEST_ARGS[@]}"
fi
