"""Protocol abuse below the JSON bodies: each case gets a clean 4xx or a closed connection, while other
clients keep being served (a /health on a fresh connection answers quickly during and after each).

The worker's memory is read before and after each case (VmRSS of the worker process) and printed, so
`pytest -s` shows what each case holds; nothing here asserts a timing beyond "served within seconds"
(the 1,000-connection goal says under 2 s, checked with a wide margin on a busy CI machine).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.integration

BODY_TIMEOUT = 2
KEEPALIVE = 3


@pytest.fixture(scope="module")
def abuse_server(start_server, model_files):
    server = start_server(
        models={"m": model_files.main},
        config=f"[server]\nbody_timeout = {BODY_TIMEOUT}\nkeepalive = {KEEPALIVE}\n",
        name="abuse",
    )
    yield server
    server.stop()


def _worker_pid(server) -> int | None:
    try:
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def _rss_kib(server) -> int:
    pid = _worker_pid(server)
    if pid is None:
        return 0
    m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) if m else 0


@pytest.fixture
def measured(abuse_server, request) -> Iterator[None]:
    before = _rss_kib(abuse_server)
    yield
    after = _rss_kib(abuse_server)
    print(f"\n[memory] {request.node.name}: worker RSS {before} -> {after} KiB ({after - before:+d})")
    _served(abuse_server)


def _served(server, within: float = 5.0) -> float:
    """Another client, on its own connection, is served: /health answers 200 within `within` s."""
    t0 = time.monotonic()
    r = requests.get(server.url + "/health", timeout=within, headers={"Connection": "close"})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, r.text
    return elapsed


def _connect(server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def _read_all(sock: socket.socket, limit: float = 15.0) -> bytes:
    """Everything until the server closes the connection (or `limit` seconds pass)."""
    sock.settimeout(limit)
    out = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return out


def _statuses(raw: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n", raw)]


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    data = _read_all(sock, seconds)
    sock.settimeout(0.5)
    try:
        assert sock.recv(1) == b"", "the connection is still open"
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def test_slow_headers_are_cut_off_and_others_are_served(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    t0 = time.monotonic()
    closed = False
    for i in range(40):  # one header line every 0.25 s: a slowloris would go on for ever
        try:
            sock.sendall(b"X-Slow-%d: y\r\n" % i)
        except OSError:
            closed = True
            break
        if i % 4 == 0:
            assert _served(abuse_server) < 5
        time.sleep(0.25)
        sock.settimeout(0.01)
        try:
            if sock.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
            break
    assert closed, "a client sending headers slowly was never cut off"
    assert time.monotonic() - t0 < KEEPALIVE + 3
    sock.close()


def test_a_slow_body_gets_a_408(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{\"model\": ")
    t0 = time.monotonic()
    assert _served(abuse_server) < 5
    raw = _closed_within(sock, BODY_TIMEOUT + KEEPALIVE + 5)
    assert _statuses(raw) == [408], raw[:300]
    assert b"request_timeout" in raw and b"\nsignature:" in raw.lower()  # an OpenAI error, signed like any other
    assert time.monotonic() - t0 < BODY_TIMEOUT + KEEPALIVE + 5
    sock.close()


def test_a_body_shorter_than_its_content_length_then_eof(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"model\": \"m\"}")
    sock.shutdown(socket.SHUT_WR)
    raw = _closed_within(sock, BODY_TIMEOUT + 5)
    assert _statuses(raw) == [400], raw[:300]  # the body ended early: a 400, not a 500 or a hang
    sock.close()


def test_a_body_longer_than_its_content_length_is_not_a_second_request(abuse_server, measured):
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 1}'
    extra = b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n"
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s%s" % (len(body), body, extra))
    raw = _closed_within(sock, 15)
    # The declared body is the request; what follows it on a connection the client asked to close is ignored.
    assert _statuses(raw) == [200], raw[:300]
    sock.close()


def test_an_oversized_header_is_refused(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    raw = _closed_within(sock, 10)
    assert len(_statuses(raw)) == 1 and 400 <= _statuses(raw)[0] < 500, raw[:300]
    sock.close()


def test_too_many_headers_are_refused(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n")
    raw = _closed_within(sock, 10)
    assert len(_statuses(raw)) == 1 and 400 <= _statuses(raw)[0] < 500, raw[:300]
    sock.close()


@pytest.mark.parametrize(
    "chunks",
    [
        b"ZZ\r\nabc\r\n0\r\n\r\n",  # not a hex size
        b"5\r\nabc\r\n0\r\n\r\n",  # shorter than its size
        b"3\r\nabcdef\r\n0\r\n\r\n",  # longer than its size
        b"-1\r\nabc\r\n0\r\n\r\n",  # negative
    ],
)
def test_chunked_encoding_errors_are_a_4xx(abuse_server, measured, chunks):
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunks)
    raw = _closed_within(sock, BODY_TIMEOUT + KEEPALIVE + 5)
    statuses = _statuses(raw)
    assert len(statuses) == 1 and 400 <= statuses[0] < 500, raw[:300]
    sock.close()


SMUGGLED = b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "head,body",
    [
        # CL.TE: a front end that reads Content-Length would forward the smuggled request as body.
        (b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n" + SMUGGLED),
        # TE.CL: a front end that reads Transfer-Encoding would end the body early.
        (b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n", b"8\r\nSMUGGLED\r\n0\r\n\r\n" + SMUGGLED),
        # An obfuscated Transfer-Encoding.
        (b"Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n" + SMUGGLED),
    ],
    ids=["CL.TE", "TE.CL", "TE-obfuscated"],
)
def test_request_smuggling_is_refused(abuse_server, measured, head, body):
    sock = _connect(abuse_server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + head + b"\r\n" + body)
    raw = _closed_within(sock, BODY_TIMEOUT + KEEPALIVE + 5)
    statuses = _statuses(raw)
    # One answer, a refusal, and the connection closed: the smuggled request is never served. An
    # unknown transfer coding gets 501, as RFC 9112 section 6.1 asks, from gunicorn's parser.
    assert len(statuses) == 1 and (400 <= statuses[0] < 500 or statuses[0] == 501), raw[:400]
    assert b'"public_key"' not in raw
    sock.close()


def test_a_non_ascii_request_target_is_refused(abuse_server, measured):
    # gunicorn refuses these before the app sees them: a 400 without our signature (README, the table).
    sock = _connect(abuse_server)
    sock.sendall("GET /héalth HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    raw = _closed_within(sock, 10)
    assert len(_statuses(raw)) == 1 and 400 <= _statuses(raw)[0] < 500, raw[:300]
    sock.close()


def test_pipelined_requests_are_answered_in_order(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /v1/keys HTTP/1.1\r\nHost: x\r\n\r\n"
                 b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = _closed_within(sock, 10)
    assert _statuses(raw) == [200, 200, 200], raw[:500]
    first_keys = raw.find(b'"public_key"')
    assert first_keys != -1 and raw.find(b'"status"') < first_keys < raw.rfind(b'"status"')
    assert raw.lower().count(b"\nsignature:") == 3
    sock.close()


def test_a_thousand_idle_keep_alive_connections(abuse_server, measured):
    idle: list[socket.socket] = []
    try:
        for _ in range(1000):
            s = _connect(abuse_server)
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # served, then kept alive, idle
            idle.append(s)
        for s in idle:
            s.settimeout(10)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
        rss = _rss_kib(abuse_server)
        took = _served(abuse_server, within=10)
        print(f"\n[idle] 1000 idle keep-alive connections: a new request served in {took * 1000:.0f} ms; "
              f"worker RSS {rss} KiB")
        assert took < 2.0 * 3, f"a new request waited {took:.1f}s behind 1000 idle connections"
    finally:
        for s in idle:
            s.close()


def test_a_client_that_never_reads_its_stream_does_not_hold_others(abuse_server, measured):
    sock = _connect(abuse_server)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"model": "m", "prompt": "Once", "max_tokens": 400, "ignore_eos": true, "stream": true}'
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    time.sleep(1.0)  # it generates into a socket nobody reads
    done: dict[str, object] = {}

    def other() -> None:
        r = requests.post(abuse_server.url + "/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 8},
                          timeout=60)
        done["status"] = r.status_code

    t = threading.Thread(target=other)
    t.start()
    t.join(60)
    assert done.get("status") == 200
    assert _served(abuse_server) < 5
    sock.close()  # the reader gives up: its generation is cancelled and its slot freed
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status = requests.get(abuse_server.url + "/status", timeout=5).json()
        if all(m.get("busy_slots", 0) == 0 for m in status["models"]):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the abandoned stream still holds a slot: {status['models']}")


def test_a_client_that_reads_its_stream_very_slowly_gets_all_of_it(abuse_server, measured):
    sock = _connect(abuse_server, timeout=60)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    body = b'{"model": "m", "prompt": "Once", "max_tokens": 60, "ignore_eos": true, "stream": true}'
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    raw = b""
    while True:
        time.sleep(0.02)
        chunk = sock.recv(256)  # a few hundred bytes at a time, slowly
        if not chunk:
            break
        raw += chunk
    assert raw.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in raw
    sock.close()
