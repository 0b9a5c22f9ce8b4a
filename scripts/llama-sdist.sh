# Sourced by scripts/llama-wheel.sh and scripts/llama-server.sh: the one pinned llama-cpp-python sdist
# (version and digest), where it is cached, and the CPU build both compile from it, so our wheel and
# the llama-server that `make bench` compares against can never drift apart.
#
#   source scripts/llama-sdist.sh; sdist=$(llama_sdist)

LLAMA_VERSION=0.3.36
LLAMA_SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CACHE=${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}

# Portable, with runtime CPU dispatch: no -march=native; ggml's CPU backend once per x86 level as
# loadable modules, the best one loaded at startup.
LLAMA_CPU_FLAGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON"

# Prints the path of the sdist, downloaded once and checked against its digest every time.
llama_sdist() {
  local sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
  mkdir -p "$CACHE/sdist"
  if [[ ! -f $sdist ]]; then
    "${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE/sdist" >&2
  fi
  echo "$LLAMA_SDIST_SHA256  $sdist" | sha256sum --check --quiet - >&2
  echo "$sdist"
}

# Fixes applied to the pinned source before either build (scripts/patches/*.patch, in name order; each
# says why). Their bytes are part of both cache keys, so a changed patch rebuilds both.
LLAMA_PATCHES_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/patches"
llama_patches_digest() {
  cat "$LLAMA_PATCHES_DIR"/*.patch | sha256sum | cut -c1-64
}
# Applies the patches to an unpacked sdist (the directory holding vendor/llama.cpp; not inside a git
# work tree, where git apply would take paths from the work tree's top).
llama_patch() {
  local p
  for p in "$LLAMA_PATCHES_DIR"/*.patch; do
    (cd "$1" && git apply -p1 --whitespace=nowarn "$p")
  done
}
