#!/bin/sh
# Runs inside the Nitro enclave (the enclave's own init is PID 1 and reaps children).
# An enclave has no network, only vsock, and its loopback starts down: bring lo up, bridge
# vsock:$VSOCK_PORT -> 127.0.0.1:$PORT, then run the appliance on loopback.
set -eu
PORT=${PORT:-3000}
VSOCK_PORT=${VSOCK_PORT:-5000}

ip link set dev lo up

# Huge pages for the sealed model copies (enclave/README.md, cvm/appliance-tmpfiles.conf); the enclave
# kernel may have no THP, and the appliance then warns at its first model load.
echo within_size > /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null \
  || echo "entrypoint: could not set shmem_enabled = within_size" >&2

# One socat child per connection (fork); the appliance sees every client as 127.0.0.1, so the config
# must require API keys (enclave/nitro/config.toml) - loopback alone proves nothing behind a bridge.
socat -d "VSOCK-LISTEN:${VSOCK_PORT},fork,reuseaddr" "TCP4:127.0.0.1:${PORT},nodelay" &

# The enclave's root file system is RAM: the one-file extraction never touches a disk.
exec /usr/local/bin/appliance --config /etc/appliance/config.toml --host 127.0.0.1 -p "${PORT}"
