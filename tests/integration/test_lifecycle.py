"""Process lifecycle: graceful shutdown on SIGTERM, and configuration errors refused before binding."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest
import requests
from appliance_it import assert_error, port_is_open, server_command, sse_events, wait_for

pytestmark = pytest.mark.integration

EXIT_CONFIG = 2


# ---------------------------------------------------------------------------------------------
# Graceful shutdown


def test_sigterm_lets_the_stream_finish_then_exits_0(start_server, model_files):
    server = start_server(models={"m": model_files.main}, name="shutdown")
    n_tokens = 200
    r = requests.post(
        server.url + "/v1/completions",
        json={"model": "m", "prompt": "Tell me everything", "max_tokens": n_tokens, "ignore_eos": True, "seed": 8,
              "stream": True, "stream_options": {"include_usage": True}},
        stream=True, timeout=120, headers={"Connection": "close"},
    )
    assert r.status_code == 200, r.text
    events = sse_events(r.iter_lines())
    before = [next(events), next(events)]
    server.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    after = list(events)
    r.close()

    assert after, "nothing arrived after SIGTERM: the stream was cut"
    assert after[-1] == "[DONE]", after[-3:]
    usage = after[-2]["usage"]
    assert usage["completion_tokens"] == n_tokens
    text_after = "".join(e["choices"][0]["text"] for e in after[:-1] if isinstance(e, dict) and e["choices"])
    assert text_after, "no text was streamed after SIGTERM: the signal came too late to test anything"
    assert sum(1 for e in before if e["choices"]) == 2

    rc = server.proc.wait(timeout=60)
    exited_after = time.monotonic() - t_term
    logs = server.stderr()
    assert rc == 0, f"exit code {rc}\n{logs}"
    assert not port_is_open(server.port), "the port still accepts connections after exit"
    with pytest.raises(requests.ConnectionError):
        requests.get(server.url + "/health", timeout=5)
    assert "Traceback" not in logs, logs
    assert "graceful timeout" not in logs.lower(), logs
    print(f"exited {exited_after:.2f}s after SIGTERM")
    print(logs[-1500:])
    server.stop()  # bookkeeping only: already exited


def test_sigterm_drains_queued_requests_too(start_server, model_files):
    """One slot: a running request and a queued one when SIGTERM arrives; both are answered in full."""
    import threading

    server = start_server(config=f'[[models]]\nname = "m"\npath = "{model_files.main}"\nparallel = 1\n', name="shutdown-queue")
    results: dict[str, requests.Response] = {}

    def run(key: str, n: int) -> None:
        results[key] = requests.post(server.url + "/v1/completions", timeout=120, headers={"Connection": "close"},
                                     json={"model": "m", "prompt": key, "max_tokens": n, "ignore_eos": True})

    first = threading.Thread(target=run, args=("first", 300))
    first.start()
    wait_for(lambda: server.status_of("m")["busy_slots"] == 1, 20, what="the first request to run")
    second = threading.Thread(target=run, args=("second", 20))
    second.start()
    wait_for(lambda: server.status_of("m")["queue_depth"] == 1, 20, what="the second request to queue")
    server.proc.send_signal(signal.SIGTERM)
    first.join(120)
    second.join(120)
    assert results["first"].status_code == 200, results["first"].text
    assert results["first"].json()["usage"]["completion_tokens"] == 300
    assert results["second"].status_code == 200, results["second"].text
    assert results["second"].json()["usage"]["completion_tokens"] == 20
    assert server.proc.wait(timeout=60) == 0, server.logs()
    server.stop()


def test_sigterm_idle_server_exits_0_quickly(start_server, model_files):
    server = start_server(models={"m": model_files.main}, name="shutdown-idle")
    assert server.get("/health").status_code == 200
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    rc = server.proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    assert rc == 0, server.logs()
    assert elapsed < 20, f"an idle server took {elapsed:.1f}s to exit"
    assert not port_is_open(server.port)
    server.stop()


# ---------------------------------------------------------------------------------------------
# Configuration errors: exit 2, a message naming the key, and the port never bound


def _run_cli(args: list[str], tmp_path, config: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    argv = [*server_command(), *args]
    if config is not None:
        cfg = tmp_path / "bad.toml"
        cfg.write_text(config)
        argv += ["--config", str(cfg)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp_path, stdin=subprocess.DEVNULL)


@pytest.fixture
def held_port():
    """A port we listen on ourselves: a server that tried to bind it would report 'Connection in use'."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def _assert_config_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    out = done.stdout + done.stderr
    assert done.returncode == EXIT_CONFIG, f"exit code {done.returncode}\n{out}"
    assert "invalid configuration" in done.stderr, out
    for needle in needles:
        assert needle in done.stderr, f"{needle!r} not in the message:\n{done.stderr}"
    # Refused before anything bound a port or started a worker.
    assert "Listening at" not in out and "Connection in use" not in out and "Booting worker" not in out, out


@pytest.mark.parametrize("value", ['"x"', "70000", "-1"])
def test_config_port_invalid(tmp_path, value):
    done = _run_cli([], tmp_path, config=f"[server]\nport = {value}\n")
    _assert_config_error(done, "server.port")


def test_port_flag_out_of_range(tmp_path):
    done = _run_cli(["-p", "70000"], tmp_path)
    _assert_config_error(done, "server.port")


def test_config_parallel_zero(tmp_path, held_port, model_files):
    config = f'[[models]]\nname = "a"\npath = "{model_files.main}"\nparallel = 0\n'
    done = _run_cli(["-p", str(held_port)], tmp_path, config=config)
    _assert_config_error(done, "models[0].parallel")


def test_model_flag_nonexistent_file(tmp_path, held_port):
    done = _run_cli(["-p", str(held_port), "--model", "x=/nonexistent.gguf"], tmp_path)
    _assert_config_error(done, "models[0].path", "/nonexistent.gguf")


@pytest.mark.parametrize(
    "config,needle",
    [
        ("[server]\nprot = 3000\n", "server.prot"),  # a typo is an error, not silently ignored
        ("[limits]\nmax_body_bytes = 10\n", "limits.max_body_bytes"),
        ("[limits]\ndefault_max_tokens = 9000\n", "limits"),
        ("[model_defaults]\nn_ctx = 8\n", "model_defaults.n_ctx"),
        ("[server]\nlog_level = \"loud\"\n", "server.log_level"),
        ("[server\nport = 1\n", "not valid TOML"),
    ],
    ids=["unknown-key", "max-body-bytes", "limits-consistency", "n-ctx", "log-level", "bad-toml"],
)
def test_config_errors_name_the_key(tmp_path, held_port, config, needle):
    done = _run_cli(["-p", str(held_port)], tmp_path, config=config)
    _assert_config_error(done, needle)


def test_config_duplicate_model_names(tmp_path, held_port, model_files):
    config = "".join(f'[[models]]\nname = "a"\npath = "{model_files.main}"\n' for _ in range(2))
    done = _run_cli(["-p", str(held_port)], tmp_path, config=config)
    _assert_config_error(done, "duplicate model name", "models")


def test_model_flag_not_gguf_and_bad_syntax(tmp_path, held_port):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"definitely not gguf" * 10)
    done = _run_cli(["-p", str(held_port), "--model", f"j={junk}"], tmp_path)
    _assert_config_error(done, "models[0].path", str(junk))
    # NAME=PATH syntax errors are argparse's usage errors (also exit 2).
    done = _run_cli(["-p", str(held_port), "--model", "no-equals-sign"], tmp_path)
    assert done.returncode == 2 and "NAME=PATH" in done.stderr, done.stderr


def test_missing_config_file(tmp_path, held_port):
    done = _run_cli(["-p", str(held_port), "--config", str(tmp_path / "nope.toml")], tmp_path)
    _assert_config_error(done, "--config", "nope.toml")


def test_configured_model_that_fails_to_load(start_server, model_files):
    """A truncated file passes the pre-bind magic check; its load fails in the worker: the server stays up,
    alive but not ready, and says why in /status."""
    truncated = model_files.dir / "configured-truncated.gguf"
    with open(model_files.main, "rb") as f:
        truncated.write_bytes(f.read(2_000_000))
    server = start_server(models={"t": truncated}, wait="health", name="failed-model")
    try:
        entry = wait_for(lambda: (s := server.status_of("t"))["state"] == "failed" and s, 60, what="the load to fail")
        assert entry["error"]
        assert_error(server.get("/readiness"), 503, "server_error", code="not_ready")
        assert server.get("/health").status_code == 200
        assert server.get("/v1/models").json()["data"] == []
        r = server.post("/v1/completions", json={"model": "t", "prompt": "x"})
        assert_error(r, 404, "invalid_request_error", code="model_not_found")
    finally:
        server.stop()


def test_sigterm_past_graceful_timeout_ends_every_request_cleanly(start_server, model_files):
    """Requests that cannot finish within graceful_timeout: just before it runs out, each stream gets a
    signed error event (shutting_down) and each plain request a signed 503, then the worker exits 0 on
    its own; nothing is cut off mid-event by the master's SIGKILL."""
    import threading

    from attestation import signing

    graceful = 6
    server = start_server(models={"m": model_files.main}, config=f"[server]\ngraceful_timeout = {graceful}\n",
                          name="shutdown-deadline")
    pk = signing.public_key_from_b64(requests.get(server.url + "/v1/keys", timeout=10).json()["public_key"])
    results: dict[int, tuple[requests.Response, bytes, signing.RequestInfo]] = {}

    def run(i: int) -> None:
        stream = i < 3
        body = json.dumps({"model": "m", "prompt": f"request {i}", "max_tokens": 4000, "ignore_eos": True,
                           "stream": stream}).encode()
        r = requests.post(server.url + "/v1/completions", data=body, stream=stream, timeout=120,
                          headers={"Content-Type": "application/json", "Connection": "close"})
        raw = b"".join(r.iter_content(chunk_size=None)) if stream else r.content
        results[i] = (r, raw, signing.RequestInfo("POST", "/v1/completions", body))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: server.status_of("m")["busy_slots"] == 4, 30, what="four requests generating")
    server.proc.send_signal(signal.SIGTERM)
    t_term = time.monotonic()
    for t in threads:
        t.join(60)
    rc = server.proc.wait(timeout=60)
    exited_after = time.monotonic() - t_term
    logs = server.stderr()

    for i in range(3):
        r, raw, info = results[i]
        assert r.status_code == 200
        signing.verify_stream(pk, request=info, status=200, headers=dict(r.headers), transcript=raw)
        events = [e for e in sse_events(iter(raw.split(b"\n"))) if e != "[DONE]"]
        assert events[-1]["error"]["code"] == "shutting_down", events[-1]  # then [DONE], as after any error
        assert any(e.get("choices") for e in events[:-1]), "no text before the error: nothing was drained"
    r, raw, info = results[3]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
    assert r.headers.get("Retry-After")
    signing.verify_response(pk, request=info, status=503, headers=dict(r.headers), body=raw)
    assert rc == 0, logs
    assert exited_after < graceful + 1, f"exited {exited_after:.1f}s after SIGTERM"
    assert "graceful timeout" not in logs.lower(), logs
    assert "Traceback" not in logs, logs
    server.stop()
