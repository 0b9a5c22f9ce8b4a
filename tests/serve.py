"""A real appliance on a free loopback port for the standalone drivers (`make fuzz`, `make soak`); the
pytest tiers use tests/integration/conftest.py's `start_server`."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def appliance(config: str, workdir: Path, *args: str, command: list[str] | None = None,
              timeout: float = 300) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start the appliance with `config` (TOML) and `args`, its output in workdir/server.log; yield
    (process, URL) once /readiness says 200; SIGTERM it after. RuntimeError if it never gets ready."""
    cfg = workdir / "appliance.toml"
    cfg.write_text(config)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = workdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*(command or [str(Path(sys.executable).with_name("appliance"))]), "-p", str(port),
                                 "--config", str(cfg), *args], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if requests.get(url + "/readiness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"the server did not get ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
