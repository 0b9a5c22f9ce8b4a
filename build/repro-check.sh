#!/usr/bin/env bash
# Reproducibility check (`make repro-check`): two clean builds of one source tree, in two different
# directories, one after the other, each with its own empty APPLIANCE_CACHE (so libllama is compiled from
# the sdist anew), its own pip cache and its own venvs. Prints both digests; exits 1 if they differ,
# after listing which archive members differ.
#
#   REPRO_DIR=/tmp/appliance-repro   builds go to ${REPRO_DIR}-a and ${REPRO_DIR}-b (wiped first)
#   REPRO_FRESH_CACHE=0              reuse $APPLIANCE_CACHE instead (skips the two libllama compiles:
#                                    checks the freezing step alone, in minutes)
#
# Source: a clean working tree is cloned at HEAD (`git clone`, so exactly the commit). A dirty one is
# snapshotted once (tracked and untracked files, .gitignore respected) and both builds get that snapshot;
# the manifests then say source_dirty = true.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BASE=${REPRO_DIR:-/tmp/appliance-repro}
PY=${PYTHON:-python3}
FRESH=${REPRO_FRESH_CACHE:-1}
log() { printf '\033[1mrepro:\033[0m %s\n' "$*" >&2; }

commit=$(git -C "$ROOT" rev-parse HEAD)
epoch=$(git -C "$ROOT" log -1 --format=%ct HEAD)
dirty=0
[[ -n $(git -C "$ROOT" status --porcelain --untracked-files=normal) ]] && dirty=1

snapshot=
if [[ $dirty == 1 ]]; then
  snapshot=$(mktemp /tmp/appliance-repro-src.XXXXXX.tar)
  # Files that exist now: tracked (minus deleted) and untracked-but-not-ignored.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [[ -e $f || -L $f ]] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf "$snapshot")
  log "working tree is dirty: both builds use one snapshot of it (HEAD $commit + changes)"
else
  log "building commit $commit"
fi

build_one() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir/src" "$dir/pip-cache"
  if [[ -n $snapshot ]]; then
    tar -xf "$snapshot" -C "$dir/src"
  else
    git clone --quiet --no-local "$ROOT" "$dir/src"
    git -C "$dir/src" checkout --quiet --detach "$commit"
  fi
  local cache=$dir/cache
  [[ $FRESH == 1 ]] || cache=${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/appliance}
  log "build in $dir (APPLIANCE_CACHE=$cache)"
  local start=$SECONDS
  (
    cd "$dir/src"
    export APPLIANCE_CACHE=$cache PIP_CACHE_DIR=$dir/pip-cache PYTHON=$PY
    export APPLIANCE_SOURCE_COMMIT=$commit APPLIANCE_SOURCE_DIRTY=$dirty SOURCE_DATE_EPOCH=$epoch
    unset MODEL MODEL_NAME COMPRESS_BINARIES WORK DIST
    make binary
  ) >"$dir/build.log" 2>&1 || { log "build in $dir failed; tail of $dir/build.log:"; tail -30 "$dir/build.log" >&2; exit 1; }
  log "  done in $(( SECONDS - start ))s: $(cut -d' ' -f1 "$dir/src/dist/appliance.sha256")"
}

A=$BASE-a
B=$BASE-b
build_one "$A"
build_one "$B"
[[ -n $snapshot ]] && rm -f "$snapshot"

a=$(cut -d' ' -f1 "$A/src/dist/appliance.sha256")
b=$(cut -d' ' -f1 "$B/src/dist/appliance.sha256")
echo "a: $a  $A/src/dist/appliance"
echo "b: $b  $B/src/dist/appliance"
if [[ $a == "$b" ]] && cmp -s "$A/src/dist/appliance.manifest.json" "$B/src/dist/appliance.manifest.json"; then
  echo "reproducible: identical binaries and manifests"
  exit 0
fi

echo "NOT reproducible; differing members:" >&2
"$A/src/build/work/cpu/venv/bin/python" - "$A/src/dist/appliance" "$B/src/dist/appliance" >&2 <<'EOF' || true
import hashlib, marshal, sys
from PyInstaller.archive.readers import CArchiveReader
def members(path):
    a = CArchiveReader(path)
    out = {name: hashlib.sha256(a.extract(name) or b"").hexdigest() for name in a.toc}
    pyz = a.open_embedded_archive("PYZ.pyz") if "PYZ.pyz" in a.toc else None
    if pyz is not None:
        for name in pyz.toc:
            code = pyz.extract(name)
            out["PYZ:" + name] = hashlib.sha256(marshal.dumps(code) if code is not None else b"").hexdigest()
    return out
x, y = members(sys.argv[1]), members(sys.argv[2])
for name in sorted(set(x) | set(y)):
    if x.get(name) != y.get(name):
        print("  ", name)
EOF
diff <(jq -S . "$A/src/dist/appliance.manifest.json" 2>/dev/null || cat "$A/src/dist/appliance.manifest.json") \
     <(jq -S . "$B/src/dist/appliance.manifest.json" 2>/dev/null || cat "$B/src/dist/appliance.manifest.json") >&2 || true
exit 1
