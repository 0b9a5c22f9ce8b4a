"""Who writes streamed tokens, on real servers: the model's scheduler thread between two decodes
(the shared server) or the event loop (a second server). Same text and verifiable signatures either
way, a client that stops reading still gets every token in order, HTTP/1.0 gets a raw body."""

from __future__ import annotations

import json
import socket
import time

import pytest
import requests
from test_trust_e2e import MAX_AGE, public_key, send, verify

from attestation import signing

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loop_server(start_server, model_files):
    return start_server(models={"m": model_files.main}, config='[server]\nstream_writes = "event_loop"\n', name="loop-writes")


def streams(server) -> dict[str, float]:
    out = {"scheduler": 0.0, "event_loop": 0.0}
    for line in server.get("/metrics").text.splitlines():
        for writer in out:
            if line.startswith(f'appliance_streams_total{{writer="{writer}"}} '):
                out[writer] = float(line.split()[-1])
    return out


def streamed_text(raw: bytes) -> str:
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice.get("delta", {}).get("content") or choice.get("text") or ""
    return text


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_both_writers_stream_the_same_signed_text(server, loop_server, route):
    base = {"model": "m", "max_tokens": 48, "seed": 11, "ignore_eos": True}
    base.update({"prompt": "Once upon a time"} if route == "/v1/completions"
                else {"messages": [{"role": "user", "content": "Tell me a story."}]})
    texts = {}
    for srv, writer in ((server, "scheduler"), (loop_server, "event_loop")):
        _, pk = public_key(srv)
        before = streams(srv)
        body = json.dumps({**base, "stream": True}).encode()
        r, raw, info = send(srv, "POST", route, body, stream=True)
        assert r.status_code == 200
        v = verify(pk, info, r, raw)
        assert v.finish_reason == "length"
        after = streams(srv)
        assert after[writer] - before[writer] == 1, (writer, before, after)
        texts[writer] = streamed_text(raw)
        whole = srv.post(route, json=base).json()["choices"][0]
        assert texts[writer] == (whole.get("text") or whole["message"]["content"])
    assert texts["scheduler"] == texts["event_loop"] and texts["scheduler"]


def _raw_request(server, body: bytes, *, version: str = "1.1", rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: a small window
    s.connect(("127.0.0.1", server.port))
    s.sendall(
        f"POST /v1/completions HTTP/{version}\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
    )
    return s


def _read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    s.settimeout(120)
    data = b""
    while chunk := s.recv(1 << 16):
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            assert rest[n : n + 2] == b"\r\n", "bad chunk framing"
            body, rest = body + rest[:n], rest[n + 2 :]
        return status, headers, body
    return status, headers, rest


def test_a_client_that_stops_reading_still_gets_every_token_in_order(server):
    # (Loopback's socket buffers hold this whole stream; writes the socket cuts short are covered
    # in-process, tests/unit/test_direct_writes.py, with a small send buffer.)
    _, pk = public_key(server)
    n = 1000
    body = json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": n, "ignore_eos": True,
                       "seed": 5, "stream": True, "stream_options": {"include_usage": True}}).encode()
    s = _raw_request(server, body, rcvbuf=4096)
    # Not reading for a while: the server keeps serving others meanwhile.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        assert requests.get(server.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - t0 < 1.0
        time.sleep(0.1)
    status, headers, raw = _read_response(s)
    assert status == 200
    v = signing.verify_stream(pk, request=signing.RequestInfo("POST", "/v1/completions", body, None), status=status,
                              headers=headers, transcript=raw, max_age=MAX_AGE)
    assert v.finish_reason == "length" and v.usage["completion_tokens"] == n
    whole = server.post("/v1/completions", json={"model": "m", "prompt": "Once upon a time", "max_tokens": n,
                                                 "ignore_eos": True, "seed": 5}).json()
    assert streamed_text(raw) == whole["choices"][0]["text"]


def test_an_http10_client_gets_a_raw_stream(server):
    _, pk = public_key(server)
    body = json.dumps({"model": "m", "prompt": "Hello", "max_tokens": 24, "seed": 3, "stream": True}).encode()
    status, headers, raw = _read_response(_raw_request(server, body, version="1.0"))
    assert status == 200 and "Transfer-Encoding" not in headers
    assert raw.endswith(b"data: [DONE]\n\n")
    signing.verify_stream(pk, request=signing.RequestInfo("POST", "/v1/completions", body, None), status=status,
                          headers=headers, transcript=raw, max_age=MAX_AGE)
