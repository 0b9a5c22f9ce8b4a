#!/usr/bin/env bash
# Assembles the pinned CUDA toolkit that the CUDA variant is compiled with, from NVIDIA's wheels on
# PyPI (build/requirements-cuda.lock, checked by hash), once, outside the repo. Prints its root
# (the directory holding bin/nvcc), to be passed as CUDAToolkit_ROOT / CUDACXX.
#
#   scripts/cuda-toolkit.sh
#
# Why not the host's toolkit: a third party must be able to rebuild the CUDA binary byte for byte,
# which needs the same compiler and headers, and the wheels are what any machine with PyPI can fetch.
# The toolkit has no GPU driver; ggml-cuda links the driver API (its virtual-memory pool), so a
# link-only stub with the driver's soname (libcuda.so.1) goes in lib/stubs, as NVIDIA's own toolkit
# ships one: at run time the host's real driver library is loaded instead; the stub is never packaged.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
LOCK=$ROOT/build/requirements-cuda.lock
CACHE=${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}
PY=${PYTHON:-python3}

KEY=$(sha256sum "$LOCK" | cut -c1-12)
OUT=$CACHE/cuda-toolkit/$KEY
TK=$OUT/nvidia/cu13
STUB_VERSION=2

# Link-only driver stub: every driver API function that cuda.h declares (after its macros pick the
# versioned names, e.g. cuMemAlloc_v2), as an empty function, in a library with the driver's soname.
# The symbols matter: this gcc links with --as-needed, so a stub without them is dropped from
# libggml-cuda.so's DT_NEEDED, the cu* references stay unbound and dlopen fails on a GPU host too
# ("undefined symbol: cuMemCreate"). With them, libggml-cuda.so needs libcuda.so.1 and binds the
# host driver's real functions when it loads.
make_stub() {
  local dir=$TK/lib/stubs tmp
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/appliance-cuda-stub.XXXXXX")
  mkdir -p "$dir"
  printf '#include <cuda.h>\n' >"$tmp/h.c"
  cc -E -P -I"$TK/include" "$tmp/h.c" | "$PY" -c '
import re, sys
names = sorted(set(re.findall(r"\bCUresult\s+(cu[A-Za-z0-9_]+)\s*\(", sys.stdin.read())))
if "cuMemCreate" not in names or len(names) < 100:
    sys.exit("cuda-toolkit: cannot list the driver API from cuda.h")
print("/* link-only stub (scripts/cuda-toolkit.sh): the real libcuda.so.1 comes from the host driver */")
print("\n".join(f"int {n}(void) {{ return 999; }}" for n in names))
' >"$tmp/stub.c"
  cc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -Wl,--build-id=none -o "$dir/libcuda.so" "$tmp/stub.c"
  echo "$STUB_VERSION" >"$dir/STUB_VERSION"
  rm -rf "$tmp"
}

if [[ -x $TK/bin/nvcc && -f $TK/include/cublas_v2.h ]]; then
  [[ $(cat "$TK/lib/stubs/STUB_VERSION" 2>/dev/null) == "$STUB_VERSION" ]] || make_stub
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

make_stub
"$TK/bin/nvcc" --version | grep -q 'release 13\.0' || { echo "cuda-toolkit: unexpected nvcc in $TK" >&2; exit 1; }
[[ -f $TK/include/cublas_v2.h ]] || { echo "cuda-toolkit: no cuBLAS headers in $TK" >&2; exit 1; }
echo "$TK"
