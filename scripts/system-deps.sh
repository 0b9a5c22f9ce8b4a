#!/usr/bin/env bash
# The Debian programs the test suite drives for real (README "Tests"): Prometheus and promtool (the
# scrape test and the compose config check), HAProxy (the load-balanced replicas test), Chromium (the
# browser tests of the web chat), umoci and
# skopeo (the OCI image tests). Installed with apt-get when missing and this runs as root; otherwise
# it names what is missing, and those tests skip saying why. Quick when everything is there.
set -euo pipefail
declare -A want=([prometheus]=prometheus [promtool]=prometheus [haproxy]=haproxy [umoci]=umoci [skopeo]=skopeo [chromium]=chromium)
missing=()
for cmd in "${!want[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("${want[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0
pkgs=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing Debian packages: $pkgs(not root or no apt-get: their tests will skip)" >&2
  exit 0
fi
echo "system-deps: installing $pkgs" >&2
export DEBIAN_FRONTEND=noninteractive
# Debian's prometheus package would start its service where systemd runs; the tests start their own.
apt-get install -y -q --no-install-recommends $pkgs >/dev/null 2>&1 || {
  apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $pkgs >/dev/null
}
