"""Many streams on one model, liveness under load, and disconnects freeing their slots."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
import requests
from appliance_it import sse_events, wait_for

pytestmark = pytest.mark.integration

MODEL = "m"


class HealthPoller(threading.Thread):
    """GET /health every ~20 ms; records every status and the worst latency."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.url = url + "/health"
        self.interval = interval
        self.stop_event = threading.Event()
        self.statuses: list[int] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        with requests.Session() as s:
            while not self.stop_event.is_set():
                t0 = time.perf_counter()
                try:
                    r = s.get(self.url, timeout=5)
                    self.statuses.append(r.status_code)
                except requests.RequestException as e:
                    self.failures.append(repr(e))
                self.latencies.append(time.perf_counter() - t0)
                self.stop_event.wait(self.interval)

    def finish(self) -> None:
        self.stop_event.set()
        self.join(10)

    @property
    def max_latency(self) -> float:
        return max(self.latencies) if self.latencies else float("nan")


def test_eight_concurrent_streams_with_health_polling(server):
    assert server.status_of(MODEL)["slots"] == 4
    n_streams, n_tokens = 8, 96
    poller = HealthPoller(server.url)
    poller.start()
    time.sleep(0.1)

    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(n_streams)

    def stream(i: int) -> None:
        try:
            text, usage, finish, timings = [], None, None, None
            with server.openai() as c:
                barrier.wait(timeout=30)
                for chunk in c.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Tell story number {i}"}],
                    max_tokens=n_tokens,
                    seed=i,
                    stream=True,
                    stream_options={"include_usage": True},
                ):
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if chunk.choices:
                        text.append(chunk.choices[0].delta.content or "")
                        if chunk.choices[0].finish_reason:
                            finish = chunk.choices[0].finish_reason
                            timings = chunk.to_dict().get("timings")
            results[i] = {"text": "".join(text), "usage": usage, "finish": finish, "timings": timings}
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    elapsed = time.perf_counter() - t0
    poller.finish()

    assert not errors, errors
    assert sorted(results) == list(range(n_streams))
    for i, res in results.items():
        assert res["finish"] == "length", (i, res)
        assert res["usage"] is not None and res["usage"].completion_tokens == n_tokens, (i, res)
        assert res["text"], i
    # 8 requests on 4 slots: at least some of them waited for a slot.
    queued = sorted(res["timings"]["queued_ms"] for res in results.values())
    print(f"8 streams x {n_tokens} tokens in {elapsed:.2f}s; queued_ms {queued}; "
          f"/health polls {len(poller.statuses)}, max latency {poller.max_latency * 1000:.1f} ms")

    assert not poller.failures, poller.failures[:5]
    assert len(poller.statuses) >= 5, "the health poller barely ran"
    assert set(poller.statuses) == {200}
    assert poller.max_latency < 1.0, f"/health took {poller.max_latency:.3f}s under load"
    assert server.status_of(MODEL)["busy_slots"] == 0


# ---------------------------------------------------------------------------------------------
# Disconnects


def _raw_request(server, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((server.host, server.port), timeout=30)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: {server.hostport}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
    )
    return sock


def _busy(server) -> int:
    return server.status_of(MODEL)["busy_slots"]


def _tokens_generated(server) -> float:
    text = server.get("/metrics").text
    m = re.search(r'^appliance_generation_tokens_total\{model="m"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture(scope="module")
def disconnect_server(start_server, model_files):
    """A server of its own for the disconnect tests, with a short graceful timeout."""
    server = start_server(models={MODEL: model_files.main}, config="[server]\ngraceful_timeout = 3\n", name="disconnect")
    yield server
    server.stop()


LONG = {"model": MODEL, "prompt": "Write a very long essay", "max_tokens": 3000, "ignore_eos": True, "seed": 5}


def test_streaming_disconnect_frees_slot(disconnect_server):
    server = disconnect_server
    wait_for(lambda: _busy(server) == 0, 30, what="an idle model before the test")
    sock = _raw_request(server, "/v1/completions", {**LONG, "stream": True})
    buf = b""
    while buf.count(b"data: ") < 3:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {buf!r}"
        buf += chunk
    assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
    assert b"text/event-stream" in buf.split(b"\r\n\r\n", 1)[0]
    assert _busy(server) == 1
    sock.close()
    closed = time.monotonic()

    wait_for(lambda: _busy(server) == 0, 2.5, what="busy_slots 0 after the client disconnected")
    freed_after = time.monotonic() - closed
    # The generation really stopped: the token counter no longer moves.
    before = _tokens_generated(server)
    time.sleep(0.3)
    assert _tokens_generated(server) == before
    print(f"slot freed {freed_after * 1000:.0f} ms after the disconnect")


def test_non_streaming_disconnect_frees_slot(disconnect_server):
    server = disconnect_server
    wait_for(lambda: _busy(server) == 0, 30, what="an idle model before the test")
    before = _tokens_generated(server)
    sock = _raw_request(server, "/v1/completions", LONG)
    wait_for(lambda: _busy(server) == 1, 10, what="the long request to occupy a slot")
    time.sleep(0.3)
    sock.close()
    closed = time.monotonic()
    wait_for(lambda: _busy(server) == 0, 2.5, what="busy_slots 0 after the client disconnected")
    generated = _tokens_generated(server) - before
    assert generated < LONG["max_tokens"], f"the abandoned request ran to completion ({generated} tokens)"
    print(f"slot freed {(time.monotonic() - closed) * 1000:.0f} ms after the disconnect; {generated:.0f} tokens generated")


def test_requests_client_timeout_frees_slot(disconnect_server):
    """A client that gives up (read timeout) and closes: the same as a disconnect."""
    server = disconnect_server
    wait_for(lambda: _busy(server) == 0, 30, what="an idle model before the test")
    with requests.Session() as s:
        with pytest.raises(requests.exceptions.ReadTimeout):
            s.post(server.url + "/v1/chat/completions", timeout=(5, 0.5), json={
                "model": MODEL, "messages": [{"role": "user", "content": "go on forever"}],
                "max_tokens": 3000, "ignore_eos": True,
            })
    wait_for(lambda: _busy(server) == 0, 2.5, what="busy_slots 0 after the client timed out")


def test_server_still_serves_after_disconnects(disconnect_server):
    server = disconnect_server
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}, stream=True)
    assert r.status_code == 200
    events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert sum(1 for e in events if isinstance(e, dict) and e.get("choices")) >= 2


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_abandoned_requests_do_not_leak_connections(start_server, model_files, stream):
    # Three connection slots in the worker; each abandoned request must give its slot back.
    server = start_server(
        models={MODEL: model_files.main},
        config="[server]\nworker_connections = 3\nkeepalive = 1\ngraceful_timeout = 3\n",
        name="conn-leak",
    )
    try:
        for _ in range(3):
            sock = _raw_request(server, "/v1/completions", {**LONG, "stream": stream})
            if stream:
                buf = b""
                while buf.count(b"data: ") < 2:
                    chunk = sock.recv(65536)
                    assert chunk, buf
                    buf += chunk
            else:
                time.sleep(0.5)
            sock.close()
            time.sleep(0.3)
        try:
            r = requests.get(server.url + "/health", timeout=5)
        except requests.RequestException as e:
            pytest.fail(f"the server stopped answering after 3 abandoned requests: {e!r}")
        assert r.status_code == 200
    finally:
        server.stop()
