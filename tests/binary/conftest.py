"""Binary tier: the frozen executable itself (`make test-binary`).

The binary under test is the first word of `$APPLIANCE_BIN` (e.g. `APPLIANCE_BIN=dist/appliance`, or
`"dist/appliance --no-default-model"` as `make test-binary` sets it for the integration tier); its build
manifest is `<binary>.manifest.json` next to it. Without `$APPLIANCE_BIN` the whole tier is skipped, so
`make test` never picks up a stale binary from an earlier build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = float(os.environ.get("APPLIANCE_TEST_READY_TIMEOUT", "60"))


def _binary() -> Path | None:
    raw = os.environ.get("APPLIANCE_BIN", "").strip()
    if not raw:
        return None
    first = Path(shlex.split(raw)[0])
    return first if first.is_absolute() else ROOT / first


@pytest.fixture(scope="session")
def binary() -> Path:
    path = _binary()
    if path is None:
        pytest.skip("APPLIANCE_BIN not set (make test-binary)")
    if not path.is_file():
        pytest.skip(f"no binary at {path} (make binary)")
    return path


@pytest.fixture(scope="session")
def manifest(binary: Path) -> dict:
    path = binary.with_name(binary.name + ".manifest.json")
    if not path.is_file():
        pytest.fail(f"{path} missing: `make binary` writes it next to the binary", pytrace=False)
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def embedded(manifest: dict) -> dict:
    if not manifest.get("model"):
        pytest.skip("this binary was built without an embedded model (MODEL=)")
    return manifest["model"]


@pytest.fixture(scope="session")
def other_model() -> Path:
    """A model that is not the embedded one: the integration tier's cached test model."""
    from tools.modelgen import ModelSpec, write_model

    spec = ModelSpec(dtype="q8_0", name="appliance-test")
    blob = json.dumps(dataclasses.asdict(spec), sort_keys=True).encode()
    key = f"{spec.name}-{spec.dtype}-{hashlib.sha256(blob).hexdigest()[:16]}"
    cache = Path(os.environ.get("APPLIANCE_CACHE") or Path.home() / ".cache" / "appliance")
    path = cache / "test-models" / f"{key}.gguf"
    if path.is_file():
        return path
    return write_model(path, spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A started binary: `.url`, `.proc`, `.tmpdir` (its TMPDIR), `.get/.post`, `.stop()`."""

    def __init__(self, proc: subprocess.Popen, port: int, tmpdir: Path, stderr: Path) -> None:
        self.proc, self.port, self.tmpdir, self._stderr = proc, port, tmpdir, stderr
        self.url = f"http://127.0.0.1:{port}"

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=kw.pop("timeout", 30), headers={"Connection": "close"}, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=kw.pop("timeout", 120), headers={"Connection": "close"}, **kw)

    def wait_for(self, path: str, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode} before {path} answered\n{self.stderr()[-3000:]}")
            try:
                if self.get(path, timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{path} not 200 within {timeout}s\n{self.stderr()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 45) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture
def run_binary(binary: Path, tmp_path: Path):
    """run_binary(*args, wait="readiness"|"health"|None, env={}) starts the binary with a private TMPDIR."""
    started: list[Running] = []

    def start(*args: str, wait: str | None = "readiness", env: dict | None = None) -> Running:
        n = len(started)
        tmpdir = tmp_path / f"tmp{n}"
        tmpdir.mkdir()
        port = free_port()
        err = tmp_path / f"stderr{n}.log"
        full_env = {**os.environ, "TMPDIR": str(tmpdir), **(env or {})}
        with open(err, "wb") as e:
            proc = subprocess.Popen(
                [str(binary), "-p", str(port), "--host", "127.0.0.1", *args],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=e, env=full_env, cwd=tmp_path,
            )
        r = Running(proc, port, tmpdir, err)
        started.append(r)
        if wait:
            r.wait_for("/" + wait)
        return r

    yield start
    for r in started:
        r.stop()
