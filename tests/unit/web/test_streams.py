"""Streamed tokens written from the scheduler thread (appliance.web.streams): framing byte for byte
as gunicorn's, what a slow or vanished client leaves, and a whole signed stream through a real
gunicorn Response over a socket pair, verified as a client verifies it."""

from __future__ import annotations

import base64
import datetime
import json
import socket
from types import SimpleNamespace

import falcon.testing
import gevent
import gevent.socket
import pytest
from gunicorn import util as gunicorn_util
from gunicorn.config import Config
from gunicorn.http.wsgi import Response as GunicornResponse

from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.streams import DirectWrites, SocketWriter
from attestation import signing
from tests.conftest import FakeRegistry

EVENT = b'data: {"choices":[{"text":"w\xc3\xb6rld"}]}\n\n'


def read_all(sock, n: int | None = None, timeout: float = 2.0) -> bytes:
    out = b""
    with gevent.Timeout(timeout, False):
        while n is None or len(out) < n:
            got = sock.recv(1 << 16)
            if not got:
                break
            out += got
    return out


def writer(sock, *, chunked=True, sent=True, log=None) -> SocketWriter:
    state = {"sent": sent}

    def send_headers():
        (log if log is not None else []).append("headers")
        sock.sendall(b"HEADERS|")
        state["sent"] = True

    return SocketWriter(sock, chunked=chunked, headers_sent=lambda: state["sent"], send_headers=send_headers)


def test_frames_are_byte_for_byte_gunicorns():
    for chunked in (True, False):
        a, b = gevent.socket.socketpair()
        w = writer(a, chunked=chunked)
        assert w.write(EVENT) is True
        assert w.write(b"") is True  # an empty chunk would end the body: nothing is written
        mine = read_all(b, timeout=0.2)
        c, d = gevent.socket.socketpair()
        gunicorn_util.write(c, EVENT, chunked)
        assert mine == read_all(d, timeout=0.2) and mine
        assert not w.pending


def test_what_the_socket_will_not_take_is_kept_and_flushed_in_order():
    a, b = gevent.socket.socketpair()
    frames = [bytes([65 + i % 26]) * 2000 for i in range(2000)]  # 4 MB: more than a socket buffer holds
    w = writer(a)
    results = [w.write(f) for f in frames]
    assert results[0] is True and False in results, results  # the socket buffer filled part of the way
    first_false = results.index(False)
    assert all(r is False for r in results[first_false:])  # once behind, everything is kept, in order
    assert w.pending
    reader = gevent.spawn(read_all, b, None, 5.0)
    w.flush()
    a.close()
    got = reader.get()
    expected = b"".join(b"%X\r\n%b\r\n" % (len(f), f) for f in frames)
    assert got == expected
    assert not w.pending


def test_nothing_is_written_before_the_headers():
    a, b = gevent.socket.socketpair()
    log: list[str] = []
    w = writer(a, sent=False, log=log)
    assert w.write(EVENT) is False
    assert read_all(b, timeout=0.1) == b""
    w.flush()
    assert log == ["headers"]
    assert read_all(b, timeout=0.2) == b"HEADERS|" + b"%X\r\n%b\r\n" % (len(EVENT), EVENT)


def test_a_vanished_client_makes_write_decline_not_raise():
    a, b = gevent.socket.socketpair()
    b.close()
    w = writer(a)
    assert w.write(EVENT) is False  # EPIPE: kept, and the greenlet's flush meets the error
    with pytest.raises(OSError):
        w.flush()


# ---------------------------------------------------------------------------------------------
# A whole response: Falcon app (fake engine) -> DirectWrites -> a real gunicorn Response


def serve_one(app, body: dict, *, version=(1, 1)) -> tuple[bytes, dict, bytes, object, bytes]:
    """Drive one request the way gunicorn's worker does: (response head, headers, body, respiter,
    request body)."""
    a, b = gevent.socket.socketpair()
    raw = json.dumps(body).encode()
    environ = falcon.testing.create_environ(
        "/v1/completions", method="POST", body=raw, headers={"Content-Type": "application/json"},
        http_version=f"{version[0]}.{version[1]}", remote_addr="127.0.0.1",
    )
    req = SimpleNamespace(version=version, method="POST", should_close=lambda: version < (1, 1))
    resp = GunicornResponse(req, a, Config())
    respiter = app(environ, resp.start_response)
    try:
        for item in respiter:
            resp.write(item)
        resp.close()
    finally:
        if hasattr(respiter, "close"):  # as gunicorn does
            respiter.close()
    a.close()
    head, headers, body = parse_http(read_all(b))
    return head, headers, body, respiter, raw


def parse_http(data: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """(head, headers, body) of a response as sent, chunked framing checked and removed."""
    head, _, rest = data.partition(b"\r\n\r\n")
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip()] = value.strip()
    if headers.get("Transfer-Encoding", "").lower() != "chunked":
        return head, headers, rest
    body = b""
    while True:
        size, _, rest = rest.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return head, headers, body
        assert rest[n : n + 2] == b"\r\n", "bad chunk framing"
        body, rest = body + rest[:n], rest[n + 2 :]


def streamed_text(transcript: bytes) -> str:
    return "".join(
        json.loads(line[6:])["choices"][0]["text"]
        for line in transcript.split(b"\n")
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"]
    )


def make_app(stream_writes: str):
    registry = FakeRegistry()
    registry.add("tiny")
    settings = Settings.model_validate({"server": {"stream_writes": stream_writes}})
    app, state = create_app(settings, models=registry)
    return DirectWrites(app), state


def streams_by(state, writer: str) -> float:
    return state.metrics.registry.get_sample_value("appliance_streams_total", {"writer": writer}) or 0.0


@pytest.mark.parametrize("version", [(1, 1), (1, 0)])
def test_a_signed_stream_written_directly_verifies(version):
    app, state = make_app("scheduler")
    body = {"model": "tiny", "prompt": "hi", "stream": True}
    head, headers, transcript, respiter, raw = serve_one(app, body, version=version)
    assert type(respiter).__name__ == "_Flushing"  # the writer was attached
    assert streams_by(state, "scheduler") == 1 and streams_by(state, "event_loop") == 0
    assert head.startswith(b"HTTP/%d.%d 200" % version)
    public = signing.public_key_from_b64(base64.b64encode(state.identity.public_raw).decode())
    v = signing.verify_stream(
        public, request=signing.RequestInfo("POST", "/v1/completions", raw, None), status=200, headers=headers,
        transcript=transcript, max_age=datetime.timedelta(seconds=60),
    )
    assert streamed_text(transcript) == "Hello, wörld!" and v.finish_reason == "stop"


def test_event_loop_writes_leave_the_response_alone():
    app, state = make_app("event_loop")
    _, _, transcript, respiter, _ = serve_one(app, {"model": "tiny", "prompt": "hi", "stream": True})
    assert type(respiter).__name__ == "SignedStream"
    assert streams_by(state, "event_loop") == 1 and streams_by(state, "scheduler") == 0
    assert transcript.rstrip().endswith(b"data: [DONE]")


def test_logprob_streams_and_json_responses_are_written_by_the_event_loop():
    app, state = make_app("scheduler")
    _, _, _, respiter, _ = serve_one(app, {"model": "tiny", "prompt": "hi", "stream": True, "logprobs": 2})
    assert type(respiter).__name__ == "SignedStream"
    _, _, body, respiter, _ = serve_one(app, {"model": "tiny", "prompt": "hi"})
    assert json.loads(body)["choices"][0]["text"] == "Hello, wörld!"


def test_scheduler_writes_need_plain_http():
    with pytest.raises(ValueError, match="stream_writes"):
        Settings.model_validate({"server": {"stream_writes": "scheduler", "tls": "attested"}})


# ---------------------------------------------------------------------------------------------
# The real scheduler thread writing, with a send buffer too small for the stream


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory):
    from appliance.engine.registry import ModelRegistry
    from tools.modelgen import ModelSpec, write_model

    path = write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", path, n_ctx=1024, parallel=2, n_threads=1))
    yield reg
    reg.stop_all()


def test_writes_cut_short_by_a_slow_reader_arrive_whole_and_in_order(real_registry, monkeypatch):
    import appliance.web.streams as dw

    declined: list[int] = []

    class CountingWriter(dw.SocketWriter):
        def write(self, data: bytes) -> bool:
            ok = super().write(data)
            if not ok:
                declined.append(len(data))
            return ok

    monkeypatch.setattr(dw, "SocketWriter", CountingWriter)
    settings = Settings.model_validate({"server": {"stream_writes": "scheduler"}})
    app, state = create_app(settings, models=real_registry)
    n = 300
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": n, "ignore_eos": True, "seed": 9,
            "stream": True, "stream_options": {"include_usage": True}}

    a, b = gevent.socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw = json.dumps(body).encode()
    environ = falcon.testing.create_environ(
        "/v1/completions", method="POST", body=raw, headers={"Content-Type": "application/json"},
        remote_addr="127.0.0.1",
    )
    resp = GunicornResponse(SimpleNamespace(version=(1, 1), method="POST", should_close=lambda: False), a, Config())

    def serve():
        respiter = DirectWrites(app)(environ, resp.start_response)
        try:
            for item in respiter:
                resp.write(item)
            resp.close()
        finally:
            respiter.close()
            a.close()

    server = gevent.spawn(serve)
    gevent.sleep(0.3)  # the reader starts late: the send buffer fills first
    data = read_all(b, timeout=60)
    server.get(timeout=10)
    assert declined, "no write was cut short: the test did not exercise what it is for"
    head, headers, transcript = parse_http(data)
    public = signing.public_key_from_b64(base64.b64encode(state.identity.public_raw).decode())
    verified = signing.verify_stream(
        public, request=signing.RequestInfo("POST", "/v1/completions", raw, None), status=200, headers=headers,
        transcript=transcript, max_age=datetime.timedelta(seconds=60),
    )
    assert verified.usage["completion_tokens"] == n
    whole = falcon.testing.TestClient(app).simulate_post(
        "/v1/completions", json={k: v for k, v in body.items() if k not in ("stream", "stream_options")},
        remote_addr="127.0.0.1",
    )
    assert streamed_text(transcript) == whole.json["choices"][0]["text"]


def test_auto_has_the_scheduler_write_only_when_decoding_takes_every_cpu():
    from appliance.web.resources.inference import Inference

    engine = SimpleNamespace(n_threads=4)

    def writes_from_scheduler(mode: str, cpus: int) -> bool:
        return Inference(FakeRegistry(), Settings().limits, stream_writes=mode, cpus=cpus)._writes_from_scheduler(engine)

    assert writes_from_scheduler("auto", 4) and writes_from_scheduler("auto", 2)
    assert not writes_from_scheduler("auto", 5)  # a CPU is left for the event loop: it writes, in parallel
    assert writes_from_scheduler("scheduler", 64) and not writes_from_scheduler("event_loop", 1)
