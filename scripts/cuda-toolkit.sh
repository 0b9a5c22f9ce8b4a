#!/usr/bin/env bash
# Assembles the pinned CUDA toolkit that the CUDA variant is compiled with, from NVIDIA's wheels on
# PyPI (build/requirements-cuda.lock, checked by hash), once, outside the repo. Prints its root
# (the directory holding bin/nvcc), to be passed as CUDAToolkit_ROOT / CUDACXX.
#
#   scripts/cuda-toolkit.sh
#
# Why not the host's toolkit: a third party must be able to rebuild the CUDA binary byte for byte,
# which needs the same compiler and headers, and the wheels are what any machine with PyPI can fetch.
# The toolkit has no GPU driver; CMake's FindCUDAToolkit wants libcuda.so to link ggml-cuda against
# (its virtual-memory pool calls the driver API), so a link-only stub with the driver's soname
# (libcuda.so.1) goes in lib/stubs, as NVIDIA's own toolkit ships one: at run time the host's real
# driver library is loaded instead, and the stub is never packaged.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCK=$ROOT/build/requirements-cuda.lock
CACHE=${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}
PY=${PYTHON:-python3}

KEY=$(sha256sum "$LOCK" | cut -c1-12)
OUT=$CACHE/cuda-toolkit/$KEY
TK=$OUT/nvidia/cu13
if [[ -x $TK/bin/nvcc && -f $TK/lib/stubs/libcuda.so && -f $TK/include/cublas_v2.h ]]; then
  echo "$TK"
  exit 0
fi

echo "assembling the pinned CUDA toolkit from PyPI once; cached in $OUT" >&2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/appliance-cuda-toolkit.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip download --quiet --no-deps --require-hashes -r "$LOCK" -d "$WORK/wheels" >&2
rm -rf "$OUT"
mkdir -p "$OUT"
for whl in "$WORK"/wheels/*.whl; do
  "$PY" -m zipfile -e "$whl" "$OUT" >&2
done
rm -rf "$OUT"/*.dist-info
chmod +x "$TK"/bin/* "$TK"/nvvm/bin/* 2>/dev/null || true
[[ -e $TK/lib64 ]] || ln -s lib "$TK/lib64"

# Unversioned names for the linker (the wheels carry only the runtime sonames).
for so in "$TK"/lib/lib*.so.[0-9]*; do
  base=${so%%.so.*}.so
  [[ -e $base ]] || ln -s "$(basename "$so")" "$base"
done

# Link-only driver stub: no symbols, just the soname. ggml-cuda's driver calls stay undefined in
# libggml-cuda.so (allowed for a shared library) and bind to the host's libcuda.so.1 when it loads.
mkdir -p "$TK/lib/stubs"
printf '/* link-only stub: the real libcuda.so.1 comes from the host NVIDIA driver */\n' >"$WORK/stub.c"
cc -shared -fPIC -nostdlib -Wl,-soname,libcuda.so.1 -o "$TK/lib/stubs/libcuda.so" "$WORK/stub.c"

"$TK/bin/nvcc" --version | grep -q 'release 13\.0' || { echo "cuda-toolkit: unexpected nvcc in $TK" >&2; exit 1; }
[[ -f $TK/include/cublas_v2.h ]] || { echo "cuda-toolkit: no cuBLAS headers in $TK" >&2; exit 1; }
echo "$TK"
