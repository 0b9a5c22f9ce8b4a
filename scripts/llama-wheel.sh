#!/usr/bin/env bash
# Builds the pinned llama-cpp-python wheel from its sdist once and caches it outside the repo,
# keyed by version and build flags, so a second setup takes seconds. Prints the wheel's path.
#
#   scripts/llama-wheel.sh [cpu|cuda]
#
# The source is unpacked and built at fixed paths and the compiler's path prefixes are mapped away,
# so the same flags give the same libraries whichever directory the repo was cloned into
# (the reproducible-binary issue builds on this).
set -euo pipefail

VARIANT=${1:-cpu}
source "$(dirname "$0")/llama-sdist.sh"
VERSION=$LLAMA_VERSION
PY=${PYTHON:-python3}

# Portable, with runtime CPU dispatch: no -march=native; ggml's CPU backend is built once per x86
# instruction-set level (x64, sse42, ..., haswell = x86-64-v3, skylakex, icelake, zen4, sapphirerapids:
# GGML_CPU_ALL_VARIANTS) as loadable modules (GGML_BACKEND_DL) installed next to libggml in
# llama_cpp/lib, and at startup ggml loads the best one this CPU supports (appliance.engine.llama
# .backend_init). The CUDA variant adds ggml-cuda as one more module: on a host without the NVIDIA
# driver it does not load and the same binary runs on the CPU. GGML_BACKEND_DIR is typed STRING so
# CMake keeps it relative (a PATH given on the command line is made absolute against the working
# directory): the modules install into the wheel's llama_cpp/lib, and no build path is compiled in.
COMMON_FLAGS="$LLAMA_CPU_FLAGS -DGGML_BACKEND_DIR:STRING=llama_cpp/lib \
-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF"
case "$VARIANT" in
  cpu)  FLAGS="$COMMON_FLAGS" ;;
  cuda)
    # The pinned toolkit from PyPI (scripts/cuda-toolkit.sh) unless CUDACXX names another nvcc.
    if [[ -z ${CUDACXX:-} ]]; then
      TK=$(PYTHON="$PY" "$(dirname "$0")/cuda-toolkit.sh")
      export CUDACXX=$TK/bin/nvcc CUDAToolkit_ROOT=$TK
    fi
    FLAGS="$COMMON_FLAGS -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS:-80-real;86-real;89-real;90-real;90-virtual}"
    # The toolkit's identity in the cache key: nvcc's build, and the driver stub it links against.
    TOOLKIT="$("$CUDACXX" --version | tail -1) $(cat "${CUDAToolkit_ROOT:-/nonexistent}/lib/stubs/STUB_VERSION" 2>/dev/null || echo host)"
    ;;
  *) echo "usage: $0 [cpu|cuda]" >&2; exit 2 ;;
esac

KEY_INPUT=$(printf '%s\n%s\n%s\n%s\n' "$VERSION" "$VARIANT" "$FLAGS" "$(llama_patches_digest)")
if [[ -n ${TOOLKIT:-} ]]; then KEY_INPUT+=$'\n'"$TOOLKIT"; fi
KEY=$(printf '%s\n' "$KEY_INPUT" | sha256sum | cut -c1-12)
OUT="$CACHE/wheels/$VERSION-$VARIANT-$KEY"
if compgen -G "$OUT/llama_cpp_python-*.whl" >/dev/null; then
  ls "$OUT"/llama_cpp_python-*.whl
  exit 0
fi

SDIST=$(PYTHON="$PY" llama_sdist)

# Fixed paths: the prefix maps below make the compiled bytes independent of them anyway.
WORK=/tmp/appliance-llama-$VARIANT-$KEY
SRC=$WORK/src
BLD=$WORK/build
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xzf "$SDIST" -C "$WORK"
mv "$WORK/llama_cpp_python-$VERSION" "$SRC"
llama_patch "$SRC"

# One map (no spaces): scikit-build-core splits CMAKE_ARGS on whitespace.
MAP="-ffile-prefix-map=$WORK=/appliance-llama"
echo "building llama-cpp-python $VERSION ($VARIANT) once; cached in $OUT" >&2
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1700000000}
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
CUDA_MAP=()
[[ $VARIANT == cuda ]] && CUDA_MAP=("-DCMAKE_CUDA_FLAGS=-Xcompiler=$MAP")
CMAKE_ARGS="$FLAGS -DCMAKE_C_FLAGS=$MAP -DCMAKE_CXX_FLAGS=$MAP ${CUDA_MAP[*]}" \
  "$PY" -m pip wheel --quiet --no-deps "$SRC" -w "$WORK/dist" \
  --config-settings=build-dir="$BLD" >&2
mkdir -p "$OUT"
printf '%s\n' "$FLAGS" >"$OUT/FLAGS"
mv "$WORK/dist"/llama_cpp_python-*.whl "$OUT/"
rm -rf "$WORK"
ls "$OUT"/llama_cpp_python-*.whl
