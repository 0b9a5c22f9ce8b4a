"""The WebSocket mode of the Responses API (`GET /v1/responses` upgraded) against a real server: the
official SDK's `responses.connect()`, every frame verified by the client's WebSocketVerifier (the 101's
signature, the chain of frames both ways, checkpoints, finals), bad input answered with error frames on
a connection that goes on, idle close, and a clean close on SIGTERM."""

from __future__ import annotations

import base64
import hashlib
import json
import signal

import openai
import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from attestation import signing

pytestmark = pytest.mark.integration

KEY = "sk-ws-test-0123456789abcdef0123"
OTHER = "sk-ws-other-fedcba9876543210fed"


def _config(idle: int = 300) -> str:
    return f"""
[server]
websocket_idle_timeout = {idle}

[limits]
max_body_bytes = 65536

[[auth.api_keys]]
name = "ws"
sha256 = "{hashlib.sha256(KEY.encode()).hexdigest()}"

[[auth.api_keys]]
name = "other"
sha256 = "{hashlib.sha256(OTHER.encode()).hexdigest()}"
"""


@pytest.fixture(scope="module")
def wserver(start_server, model_files):
    server = start_server(models={"m": model_files.main}, config=_config(), name="websocket")
    yield server
    server.stop()


def _ws_url(server) -> str:
    return server.url.replace("http://", "ws://") + "/v1/responses"


class Recorder:
    """A raw client: what it sent and received, frame by frame, for the verifier."""

    def __init__(self, server, key: str = KEY) -> None:
        self.ws = connect(_ws_url(server), additional_headers={"Authorization": f"Bearer {key}"}, open_timeout=30,
                          max_size=None)
        pk = signing.public_key_from_b64(requests.get(server.url + "/v1/keys", timeout=10).json()["public_key"])
        headers = {k.lower(): v for k, v in self.ws.response.headers.raw_items()}
        self.verifier = signing.WebSocketVerifier(pk, signing.RequestInfo("GET", "/v1/responses", b""), headers)
        self.frames: list[bytes] = []
        self.sent_frames: list[bytes] = []
        self.last_event: bytes = b""

    def send(self, obj) -> None:
        data = obj if isinstance(obj, (bytes, str)) else json.dumps(obj)
        self.ws.send(data)
        if isinstance(data, str):
            self.verifier.sent(data.encode())
            self.sent_frames.append(data.encode())

    def until_final(self, timeout: float = 120) -> list[dict]:
        """The events of one response (or the error frames before a final), verified, up to its final."""
        events = []
        while True:
            raw = self.ws.recv(timeout=timeout)
            frame = raw.encode() if isinstance(raw, str) else raw
            self.frames.append(frame)
            checked = self.verifier.received(frame)
            obj = json.loads(frame)
            if checked is not None and obj["type"] == "appliance.final":
                return events
            if checked is None:
                events.append(obj)
                self.last_event = frame

    def next_event(self, timeout: float = 60) -> dict:
        """The next event frame (checkpoints verified and passed over)."""
        while True:
            raw = self.ws.recv(timeout=timeout)
            frame = raw.encode() if isinstance(raw, str) else raw
            if self.verifier.received(frame) is None:
                return json.loads(frame)

    def close(self) -> None:
        self.ws.close()


def test_responses_over_a_websocket_every_frame_verified(wserver):
    c = Recorder(wserver)
    try:
        c.send({"type": "response.create", "model": "m", "input": "Hello", "max_output_tokens": 5})
        events = c.until_final()
        kinds = [e["type"] for e in events]
        assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete"), kinds
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        first = events[-1]["response"]
        turns = [(c.sent_frames[0], c.last_event)]
        # a second response on the same connection continues the first
        c.send({"type": "response.create", "model": "m", "input": "And then?", "max_output_tokens": 4,
                "previous_response_id": first["id"]})
        events = c.until_final()
        second = events[-1]["response"]
        turns.append((c.sent_frames[1], c.last_event))
        assert second["previous_response_id"] == first["id"]
        assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
        assert len(c.verifier.finals) == 2 and c.verifier.finals[1]["client_seq"] == 2
        # the conversation turn rides in the signed final, as in a stream's final line
        chain = signing.ConversationChain(first["id"])
        for fin, (sent, answer) in zip(c.verifier.finals, turns):
            prev, head = (base64.b64decode(fin["conversation"][k]) for k in ("prev", "head"))
            chain.add(prev, head, sent, answer)
        assert chain.turns == 2
        # a tampered frame is caught by the verifier
        tampered = signing.WebSocketVerifier(
            c.verifier._key, signing.RequestInfo("GET", "/v1/responses", b""),
            {k.lower(): v for k, v in c.ws.response.headers.raw_items()},
        )
        with pytest.raises(signing.VerificationError):
            for i, frame in enumerate(c.frames):
                tampered.received(frame.replace(b'"sequence_number":1,', b'"sequence_number":9,') if i == 1 else frame)
    finally:
        c.close()


def test_the_official_sdk_connects(wserver):
    client = openai.OpenAI(base_url=wserver.url + "/v1", api_key=KEY, max_retries=0)
    with client.responses.connect() as conn:
        conn.response.create(model="m", input="Hi there", max_output_tokens=5)
        text, done = [], None
        for event in conn:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
            elif event.type in ("response.completed", "response.incomplete"):
                done = event.response
                break
            elif event.type == "error":
                pytest.fail(f"error event: {event}")
        assert done is not None and done.output[0].content[0].text == "".join(text)


def test_bad_input_gets_error_frames_and_the_connection_goes_on(wserver):
    c = Recorder(wserver)
    try:
        for bad, code in ((b"not json", "invalid_json"), ({"type": "session.update"}, "unknown_event_type"),
                          ({"type": "response.create", "model": "no-such-model", "input": "x"}, "model_not_found"),
                          ({"type": "response.create", "model": "m", "input": "x", "previous_response_id": "resp_nope"},
                           "previous_response_not_found"),
                          ({"type": "response.create", "model": "m", "input": "x", "tools": [{"type": "function"}]},
                           None)):
            c.send(bad.decode() if isinstance(bad, bytes) else bad)
            ev = c.next_event()
            assert ev["type"] == "error" and ev["error"]["message"], ev
            if code:
                assert ev["error"]["code"] == code, ev
        # a second create while one is in flight: refused, the first completes
        c.send({"type": "response.create", "model": "m", "input": "One", "max_output_tokens": 24})
        c.send({"type": "response.create", "model": "m", "input": "Two", "max_output_tokens": 4})
        events = c.until_final()
        codes = [e["error"]["code"] for e in events if e["type"] == "error"]
        assert codes == ["response_in_flight"], codes
        assert events[-1]["type"] in ("response.completed", "response.incomplete")
        # binary frames are refused
        c.ws.send(b"\x00\x01")
        assert c.next_event()["error"]["code"] == "invalid_frame"
        # and the connection still serves
        c.send({"type": "response.create", "model": "m", "input": "Still there?", "max_output_tokens": 3})
        assert c.until_final()[-1]["type"] in ("response.completed", "response.incomplete")
        # an oversized message: an error frame, then a close with 1009
        c.ws.send("x" * 70000)
        assert c.next_event()["error"]["code"] == "message_too_large"
        with pytest.raises(ConnectionClosed) as e:
            c.ws.recv(timeout=10)
        assert e.value.rcvd is not None and e.value.rcvd.code == 1009
    finally:
        c.close()
    # the server is fine
    assert requests.get(wserver.url + "/health", timeout=10).status_code == 200


def test_auth_applies_and_another_key_cannot_continue(wserver):
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as e:
        connect(_ws_url(wserver), open_timeout=10)
    assert e.value.response.status_code == 401
    a = Recorder(wserver)
    try:
        a.send({"type": "response.create", "model": "m", "input": "Mine", "max_output_tokens": 3})
        rid = a.until_final()[-1]["response"]["id"]
    finally:
        a.close()
    b = Recorder(wserver, OTHER)
    try:
        b.send({"type": "response.create", "model": "m", "input": "x", "previous_response_id": rid})
        ev = b.next_event()
        assert ev["type"] == "error" and ev["error"]["code"] == "previous_response_not_found"
    finally:
        b.close()
    r = requests.get(wserver.url + "/v1/responses", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert r.status_code == 426 and r.json()["error"]["code"] == "upgrade_required"


def test_idle_close_and_a_clean_close_on_sigterm(start_server, model_files):
    server = start_server(models={"m": model_files.main}, config=_config(idle=2), name="websocket-idle")
    c = Recorder(server)
    with pytest.raises(ConnectionClosed) as e:
        c.ws.recv(timeout=30)
    assert e.value.rcvd is not None and (e.value.rcvd.code, e.value.rcvd.reason) == (1000, "idle")
    c = Recorder(server)
    c.send({"type": "response.create", "model": "m", "input": "Hi", "max_output_tokens": 3})
    c.until_final()
    server.proc.send_signal(signal.SIGTERM)
    with pytest.raises(ConnectionClosed) as e:
        c.ws.recv(timeout=30)
    assert e.value.rcvd is not None and e.value.rcvd.code == 1001
    assert server.proc.wait(60) == 0
