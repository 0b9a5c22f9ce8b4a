#!/usr/bin/env bash
# Builds llama.cpp's own llama-server from the llama.cpp tree inside the same pinned llama-cpp-python
# sdist that our wheel is built from, with the same CPU flags, once; caches it outside the repo.
# Prints the binary's path. Used by `make bench` to compare side by side. With --cached it builds
# nothing: it prints the path only where the build is already cached, else exits 3 (the parity tests).
set -euo pipefail

source "$(dirname "$0")/llama-sdist.sh"
VERSION=$LLAMA_VERSION
PY=${PYTHON:-python3}
# The same CPU build as scripts/llama-wheel.sh cpu, so the comparison is like for like: ggml's CPU
# backend once per x86 instruction-set level as loadable modules, the best one loaded at startup
# (llama-server loads them from its own directory). Shared libraries, found through RUNPATH=$ORIGIN.
FLAGS="$LLAMA_CPU_FLAGS -DBUILD_SHARED_LIBS=ON \
-DCMAKE_BUILD_RPATH=\$ORIGIN -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH=\$ORIGIN \
-DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
-DLLAMA_BUILD_SERVER=ON -DCMAKE_BUILD_TYPE=Release"
KEY=$(printf '%s\n%s\n%s\n' "$VERSION" "$FLAGS" "$(llama_patches_digest)" | sha256sum | cut -c1-12)
OUT="$CACHE/llama-server/$VERSION-$KEY"
if [[ -x $OUT/llama-server ]]; then
  echo "$OUT/llama-server"
  exit 0
fi
if [[ ${1:-} == --cached ]]; then
  echo "llama-server is not built: bash scripts/llama-server.sh builds it once into $OUT" >&2
  exit 3
fi

SDIST=$(PYTHON="$PY" llama_sdist)

WORK=/tmp/appliance-llama-server-$KEY
rm -rf "$WORK"
mkdir -p "$WORK"
tar -xzf "$SDIST" -C "$WORK" "llama_cpp_python-$VERSION/vendor/llama.cpp"
llama_patch "$WORK/llama_cpp_python-$VERSION"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
echo "building llama-server (llama.cpp from llama-cpp-python $VERSION) once; cached in $OUT" >&2
# shellcheck disable=SC2086
cmake -S "$SRC" -B "$WORK/build" -G Ninja $FLAGS >&2
cmake --build "$WORK/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" >&2
mkdir -p "$OUT"
cp -a "$WORK/build/bin/llama-server" "$WORK"/build/bin/lib*.so* "$OUT/"
printf '%s\n' "$FLAGS" >"$OUT/FLAGS"
rm -rf "$WORK"
echo "$OUT/llama-server"
