"""attestation.client in-process: attest(), VerifyingTransport under the official openai client,
the incremental StreamVerifier, and the `verify` CLI.

The real Falcon app (`appliance.web.app.create_app`, simulated evidence) serves through httpx2's
WSGITransport, or on a loopback socket (wsgiref) where the standard-library client is under test;
the fake model registry of the contract tier stands in for llama.cpp. Tampering happens in a
wrapping transport that rewrites responses on their way to the verifier.
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import httpx2
import openai
import pytest

from appliance.settings import Settings
from appliance.trust.identity import Identity
from appliance.web.app import create_app
from attestation import cli as att_cli
from attestation import client as C
from attestation.client import (
    AttestationFailed,
    StreamVerifier,
    VerificationError,
    VerifyingTransport,
    attest,
    verified_openai_client,
    verified_request,
)
from attestation.policy import Policy
from attestation.signing import (
    NONCE_HEADER,
    REQUEST_DIGEST_HEADER,
    SSE_DONE,
    RequestInfo,
    content_digest,
    public_key_from_b64,
    verify_stream,
)
from tests.conftest import FakeRegistry

ROOT = Path(__file__).resolve().parents[3]
SIGNING_VECTORS = ROOT / "spec" / "vectors" / "signing"
URL = "http://appliance.test"
NOW = 1_700_000_000.0
ALLOW = Policy(allow_simulated=True)
MESSAGES = [{"role": "user", "content": "hi"}]


def _settings(**attestation) -> Settings:
    return Settings.model_validate({"attestation": {"provider": "simulated", "rate_per_minute": 0, **attestation}})


class Env:
    def __init__(self, settings: Settings | None = None, clock=time.time) -> None:
        self.registry = FakeRegistry()
        self.registry.add("tiny")
        self.identity = Identity(clock=clock)
        self.app, self.state = create_app(settings or _settings(), models=self.registry, wall_clock=clock, identity=self.identity)
        self.wsgi = httpx2.WSGITransport(app=self.app)


@pytest.fixture
def env() -> Env:
    return Env()


class Tamper(httpx2.BaseTransport):
    """Wraps a transport; records requests; `mutate(request, status, headers, body)` may rewrite responses."""

    def __init__(self, inner, mutate=None) -> None:
        self.inner = inner
        self.mutate = mutate
        self.requests: list[tuple[httpx2.Request, bytes]] = []
        self.responses: list[tuple[int, list, bytes]] = []

    def handle_request(self, request):
        body = request.read()
        self.requests.append((request, body))
        resp = self.inner.handle_request(request)
        data = b"".join(resp.stream)
        resp.stream.close()
        status, headers = resp.status_code, list(resp.headers.multi_items())
        self.responses.append((status, headers, data))
        if self.mutate is not None:
            status, headers, data = self.mutate(request, status, headers, data)
        return httpx2.Response(status, headers=headers, stream=httpx2.ByteStream(data))


def only_for(path: str, fn):
    """A mutation applied only to responses for `path`."""

    def mutate(request, status, headers, data):
        if request.url.path != path:
            return status, headers, data
        return fn(request, status, headers, data)

    return mutate


def oai(transport, **kw) -> openai.OpenAI:
    hooks = {"request": [lambda r: r.headers.pop("authorization", None)]}
    return openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0,
                         http_client=httpx2.Client(transport=transport, event_hooks=hooks), **kw)


def flip(data: bytes, key: bytes) -> bytes:
    """Change the first character of the string value of `key` (a letter to another letter, a digit to another digit)."""
    m = re.search(rb'"' + key + rb'":\s*"(?=[^"])', data)
    assert m, (key, data[:300])
    i = m.end()
    c = data[i : i + 1]
    new = b"1" if c == b"0" else b"0" if c.isdigit() else (b"x" if c != b"x" else b"y")
    return data[:i] + new + data[i + 1 :]


def events_of(data: bytes) -> list[bytes]:
    return [p + b"\n\n" for p in data[:-2].split(b"\n\n")]


def data_events(evs: list[bytes]) -> list[int]:
    return [i for i, e in enumerate(evs) if e.startswith(b"data: {")]


# ---------------------------------------------------------------------------------------------
# attest()


def test_attest_binds_the_signing_key_to_the_evidence_and_the_request():
    env = Env(clock=lambda: NOW)
    tamper = Tamper(env.wsgi)
    a = attest(URL, policy=ALLOW, http=httpx2.Client(transport=tamper), now=NOW, random_bytes=lambda n: b"\x07" * n)
    assert a.nonce == "07" * 32
    assert a.signing_key.public_bytes_raw() == env.identity.public_raw and a.kid == env.identity.kid
    assert a.claims["nonce"] == a.nonce and a.models == ["tiny"] and a.base_url == URL
    status = {f.name: f.status for f in a.factors}
    assert status["provider"] == "pass" and status["nonce"] == "pass" and status["response-signature"] == "pass"
    assert "fail" not in status.values()
    assert "response-signature" in a.table() and a.report.ok
    (req, body), = tamper.requests
    assert req.method == "GET" and body == b""
    assert req.url.raw_path == b"/v1/attestation?nonce=" + b"07" * 32
    assert req.headers[NONCE_HEADER] == "07" * 32


def test_attest_nonces_are_fresh(env):
    seen = {attest(URL, policy=ALLOW, http=env.wsgi).nonce for _ in range(3)}
    assert len(seen) == 3 and all(len(n) == 64 for n in seen)


def test_attest_refuses_simulated_evidence_without_opt_in(env):
    with pytest.raises(AttestationFailed) as info:
        attest(URL, policy=Policy(), http=env.wsgi)
    assert [f.name for f in info.value.report.failures()] == ["provider"]


def test_attest_checks_the_random_source(env):
    with pytest.raises(ValueError):
        attest(URL, policy=ALLOW, http=env.wsgi, random_bytes=lambda n: b"short")


def test_attest_http_error_fails_closed():
    env = Env(_settings(provider="none"))
    with pytest.raises(AttestationFailed) as info:
        attest(URL, policy=ALLOW, http=env.wsgi)
    (f,) = info.value.report.failures()
    assert f.name == "fetch" and "503" in f.detail


def test_attest_replayed_attestation_is_refused(env):
    first = Tamper(env.wsgi)
    attest(URL, policy=ALLOW, http=first)
    old = first.responses[0]
    replay = Tamper(env.wsgi, mutate=lambda request, *_: old)
    with pytest.raises(AttestationFailed) as info:
        attest(URL, policy=ALLOW, http=replay)
    assert "nonce" in {f.name for f in info.value.report.failures()}


def test_attest_document_resigned_by_a_man_in_the_middle(env):
    mitm = Identity()

    def resign(request, status, headers, data):
        kept = {k: v for k, v in headers
                if k.lower() not in ("signature", "signature-input", "content-digest", "appliance-request-digest")}
        info = RequestInfo("GET", request.url.raw_path.decode(), b"", request.headers[NONCE_HEADER])
        signed = mitm.sign_response(info, status, {k.lower(): v for k, v in kept.items()}, data)
        return status, list({**kept, **signed}.items()), data

    with pytest.raises(AttestationFailed) as info:
        attest(URL, policy=ALLOW, http=Tamper(env.wsgi, mutate=resign))
    assert [f.name for f in info.value.report.failures()] == ["response-signature"]


@pytest.mark.parametrize("what", ["evidence", "claims", "signature", "not-json", "huge"])
def test_attest_altered_responses_fail(env, what):
    def mutate(request, status, headers, data):
        doc = json.loads(data)
        if what == "evidence":
            ev = json.loads(base64.b64decode(doc["evidence_b64"]))
            ev["report_data"] = "00" * 64
            doc["evidence_b64"] = base64.b64encode(json.dumps(ev).encode()).decode()
            return status, headers, json.dumps(doc).encode()
        if what == "claims":
            return status, headers, data.replace(b'"variant": "cpu"', b'"variant": "cud"')
        if what == "signature":
            return status, [(k, v) for k, v in headers if k.lower() != "signature"], data
        if what == "not-json":
            return status, headers, b"<html>proxy error</html>"
        return status, headers, b" " * (C.MAX_ATTESTATION_BYTES + 1)

    with pytest.raises(AttestationFailed):
        attest(URL, policy=ALLOW, http=Tamper(env.wsgi, mutate=mutate))


# ---------------------------------------------------------------------------------------------
# VerifyingTransport under the openai client


def test_openai_calls_are_verified(env):
    tamper = Tamper(env.wsgi)
    vt = VerifyingTransport(URL, policy=ALLOW, transport=tamper, now=time.time)
    with oai(vt) as c:
        r = c.chat.completions.create(model="tiny", messages=MESSAGES)
        assert r.choices[0].message.content == "Hello, wörld!"
        r = c.completions.create(model="tiny", prompt="Hi", max_tokens=3)
        assert r.choices[0].text == "Hello, wörld"
        chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello, wörld!"
        chunks = list(c.completions.create(model="tiny", prompt="Hi", stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 4
        assert [m.id for m in c.models.list()] == ["tiny"]
    assert (vt.verified_responses, vt.verified_streams) == (3, 2)
    # one attestation, then every request with its own fresh nonce
    paths = [r.url.path for r, _ in tamper.requests]
    assert paths[0] == "/v1/attestation" and paths.count("/v1/attestation") == 1
    nonces = [r.headers[NONCE_HEADER] for r, _ in tamper.requests]
    assert len(set(nonces)) == len(nonces)


def test_verified_error_responses_reach_the_caller_as_api_errors(env):
    vt = VerifyingTransport(URL, policy=ALLOW, transport=env.wsgi)
    with oai(vt) as c, pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MESSAGES)
    assert vt.verified_responses == 1


def test_transport_takes_an_attested_appliance(env):
    a = attest(URL, policy=ALLOW, http=env.wsgi)
    tamper = Tamper(env.wsgi)
    vt = VerifyingTransport(appliance=a, transport=tamper)
    assert vt.appliance is a
    with oai(vt) as c:
        c.completions.create(model="tiny", prompt="Hi", max_tokens=2)
    assert [r.url.path for r, _ in tamper.requests] == ["/v1/completions"]


def test_transport_attestation_failure_raises_before_any_prompt_is_sent(env):
    tamper = Tamper(env.wsgi)
    vt = VerifyingTransport(URL, policy=Policy(), transport=tamper)
    with oai(vt) as c, pytest.raises(AttestationFailed):
        c.completions.create(model="tiny", prompt="secret", max_tokens=2)
    assert [r.url.path for r, _ in tamper.requests] == ["/v1/attestation"]


def test_transport_refuses_other_origins_without_sending(env):
    tamper = Tamper(env.wsgi)
    vt = VerifyingTransport(URL, policy=ALLOW, transport=tamper)
    with httpx2.Client(transport=vt) as h:
        with pytest.raises(VerificationError, match="not the attested appliance"):
            h.post("http://elsewhere.test/v1/completions", json={"prompt": "secret"})
        with pytest.raises(VerificationError, match="not the attested appliance"):
            h.get("https://appliance.test/v1/models")  # same host, other scheme and port
    assert all(r.url.host == "appliance.test" and r.url.scheme == "http" for r, _ in tamper.requests)


def test_transport_needs_url_and_policy_or_an_appliance():
    with pytest.raises(ValueError):
        VerifyingTransport(URL)


def test_verified_openai_client_helper(env):
    c = verified_openai_client(URL, policy=ALLOW, transport=env.wsgi, max_retries=0)
    assert str(c.base_url) == URL + "/v1/"
    assert c.completions.create(model="tiny", prompt="Hi", max_tokens=1).choices[0].text == "Hello"


def _replay_first(path):
    saved = {}

    def mutate(request, status, headers, data):
        if request.url.path != path:
            return status, headers, data
        return saved.setdefault("r", (status, headers, data))

    return mutate


def _sse_mutation(kind):
    def fn(request, status, headers, data):
        evs = events_of(data)
        d = data_events(evs)
        if kind == "alter":
            evs[d[1]] = flip(evs[d[1]], b"content")
        elif kind == "drop":
            del evs[d[1]]
        elif kind == "truncate":
            evs = evs[: d[-1] + 1]
        elif kind == "drop-final":
            evs = [e for e in evs if not e.startswith(b": appliance-final ")]
        elif kind == "append":
            evs = evs + [evs[d[0]]]
        elif kind == "cut-mid-event":
            return status, headers, b"".join(evs)[:-5]
        elif kind == "strip-signature":
            return status, [(k, v) for k, v in headers if k.lower() != "signature"], data
        return status, headers, b"".join(evs)

    return fn


JSON_CASES = {
    "flip-json-char": lambda req, s, h, d: (s, h, flip(d, b"content")),
    "strip-signature": lambda req, s, h, d: (s, [(k, v) for k, v in h if k.lower() != "signature"], d),
    "status-changed": lambda req, s, h, d: (201, h, d),
    "unsigned-proxy-error": lambda req, s, h, d: (502, [("content-type", "text/html")], b"<h1>Bad gateway</h1>"),
    "body-truncated": lambda req, s, h, d: (s, [(k, v) for k, v in h if k.lower() != "content-length"], d[:-10]),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_tampered_json_response_raises(env, case):
    vt = VerifyingTransport(URL, policy=ALLOW, transport=Tamper(env.wsgi, only_for("/v1/chat/completions", JSON_CASES[case])))
    with oai(vt) as c, pytest.raises(VerificationError):
        c.chat.completions.create(model="tiny", messages=MESSAGES)
    assert vt.verified_responses == 0


def test_replayed_json_response_raises(env):
    vt = VerifyingTransport(URL, policy=ALLOW, transport=Tamper(env.wsgi, _replay_first("/v1/chat/completions")))
    with oai(vt) as c:
        c.chat.completions.create(model="tiny", messages=MESSAGES)  # recorded (and genuine)
        with pytest.raises(VerificationError, match="does not verify"):
            c.chat.completions.create(model="tiny", messages=MESSAGES)


@pytest.mark.parametrize("kind", ["alter", "drop", "truncate", "drop-final", "append", "cut-mid-event", "strip-signature"])
def test_tampered_stream_raises_and_delivers_only_verified_chunks(env, kind):
    genuine_vt = VerifyingTransport(URL, policy=ALLOW, transport=env.wsgi)
    with oai(genuine_vt) as c:
        genuine = [ch.model_dump() for ch in c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True)]
    vt = VerifyingTransport(URL, policy=ALLOW, transport=Tamper(env.wsgi, only_for("/v1/chat/completions", _sse_mutation(kind))))
    got = []
    with oai(vt) as c, pytest.raises(VerificationError):
        for chunk in c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True):
            got.append(chunk.model_dump())
    # Chunks covered by a verified checkpoint may arrive before the tampering is found; each is genuine
    # (ids and timestamps aside), and the stream never completes.
    strip = lambda ch: {k: v for k, v in ch.items() if k not in ("id", "created")}  # noqa: E731
    assert [strip(g) for g in got] == [strip(g) for g in genuine[: len(got)]]
    assert len(got) < len(genuine)


def test_replayed_stream_raises(env):
    vt = VerifyingTransport(URL, policy=ALLOW, transport=Tamper(env.wsgi, _replay_first("/v1/chat/completions")))
    with oai(vt) as c:
        list(c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        with pytest.raises(VerificationError, match="does not verify"):
            list(c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))


# ---------------------------------------------------------------------------------------------
# The request body's digest, whichever way it travels (spec/signing.md §2.3)


class RequestTamper(httpx2.BaseTransport):
    """Rewrites each request (after the verifying transport has recorded what it sent)."""

    def __init__(self, inner, change) -> None:
        self.inner = inner
        self.change = change

    def handle_request(self, request):
        if request.url.path == "/v1/attestation":
            return self.inner.handle_request(request)
        body = request.read()
        headers, body = self.change(dict(request.headers), body)
        return self.inner.handle_request(httpx2.Request(request.method, request.url, headers=headers, content=body))


def _add_digest(value=None):
    def hook(request):
        request.headers["Content-Digest"] = value if value is not None else content_digest(request.read())
    return hook


def _oai_with_hooks(transport, *hooks) -> openai.OpenAI:
    all_hooks = {"request": [lambda r: r.headers.pop("authorization", None), *hooks]}
    return openai.OpenAI(base_url=URL + "/v1", api_key="none", max_retries=0,
                         http_client=httpx2.Client(transport=transport, event_hooks=all_hooks))


def test_transport_verifies_responses_bound_by_the_callers_content_digest(env):
    tamper = Tamper(env.wsgi)
    vt = VerifyingTransport(URL, policy=ALLOW, transport=tamper)
    with _oai_with_hooks(vt, _add_digest()) as c:
        assert c.chat.completions.create(model="tiny", messages=MESSAGES).choices[0].message.content == "Hello, wörld!"
        chunks = list(c.chat.completions.create(model="tiny", messages=MESSAGES, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello, wörld!"
    assert (vt.verified_responses, vt.verified_streams) == (1, 1)
    for status, headers, _ in tamper.responses[1:]:  # after the attestation: bound by "content-digest";req
        names = {k.lower() for k, _ in headers}
        assert status == 200 and REQUEST_DIGEST_HEADER not in names
        sig_input = next(v for k, v in headers if k.lower() == "signature-input")
        assert '"content-digest";req' in sig_input and f'"{REQUEST_DIGEST_HEADER}"' not in sig_input


def test_transport_verifies_the_400_for_a_content_digest_that_does_not_match(env):
    vt = VerifyingTransport(URL, policy=ALLOW, transport=env.wsgi)
    with _oai_with_hooks(vt, _add_digest(content_digest(b"another body"))) as c, pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="tiny", messages=MESSAGES)
    assert "Content-Digest" in e.value.message
    assert vt.verified_responses == 1  # the 400 verified: bound to the body sent, by Appliance-Request-Digest


@pytest.mark.parametrize("digest", [True, False])
def test_transport_refuses_the_answer_to_a_body_changed_in_transit(env, digest):
    """Whichever way the body's digest travels, an answer to another body fails: the changed body with
    the caller's Content-Digest is refused (400, bound to the body received); stripped of it, answered,
    and bound to the body received. Neither is the digest of the body sent."""
    def change(headers, body):
        headers = {k: v for k, v in headers.items() if k.lower() not in ("content-digest", "content-length")}
        return headers, body.replace(b'"hi"', b'"yo"')

    def change_keep_digest(headers, body):
        headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
        return headers, body.replace(b'"hi"', b'"yo"')

    vt = VerifyingTransport(URL, policy=ALLOW, transport=RequestTamper(env.wsgi, change_keep_digest if digest else change))
    hooks = [_add_digest()] if digest else []
    with _oai_with_hooks(vt, *hooks) as c, pytest.raises(VerificationError, match="appliance-request-digest"):
        c.chat.completions.create(model="tiny", messages=MESSAGES)
    assert vt.verified_responses == 0


def test_transport_accepts_a_content_digest_stripped_in_transit(env):
    """The body arrived unchanged without the caller's Content-Digest: the answer is bound by
    Appliance-Request-Digest to that same body, which is still this request's answer."""
    def strip(headers, body):
        return {k: v for k, v in headers.items() if k.lower() != "content-digest"}, body

    vt = VerifyingTransport(URL, policy=ALLOW, transport=RequestTamper(env.wsgi, strip))
    with _oai_with_hooks(vt, _add_digest()) as c:
        assert c.chat.completions.create(model="tiny", messages=MESSAGES).choices[0].message.content
    assert vt.verified_responses == 1


def test_module_is_importable_without_httpx2():
    code = (
        "import sys; sys.modules['httpx2'] = None\n"
        "import attestation.client as c\n"
        "try:\n    c.VerifyingTransport('http://x', policy=None)\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ImportError")


# ---------------------------------------------------------------------------------------------
# StreamVerifier against the signing vectors (the reference verifier is verify_stream)


def _stream_vectors() -> dict[str, dict]:
    out = {}
    for p in sorted(SIGNING_VECTORS.glob("*.json")):
        doc = json.loads(p.read_text())
        if doc.get("kind") == "stream":
            out[p.stem] = doc
    return out


STREAMS = _stream_vectors()


def _vector_parts(doc):
    r = doc["request"]
    info = RequestInfo(r["method"], r["target"], base64.b64decode(r.get("body_b64", "")), r.get("nonce"), r.get("content_digest"))
    return public_key_from_b64(doc["public_key"]), info, doc["response"], base64.b64decode(doc["response"]["body_b64"])


def _run_incremental(doc, size: int):
    key, info, resp, transcript = _vector_parts(doc)
    released = []
    v = StreamVerifier(key, request=info, status=resp["status"], headers=resp["headers"])
    for i in range(0, len(transcript), size):
        released += v.feed(transcript[i : i + size])
    released += v.finish()
    return v, released


def test_signing_stream_vectors_exist():
    assert "valid-stream" in STREAMS and len(STREAMS) > 10


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("size", [1, 7, 1 << 20])
def test_incremental_verifier_agrees_with_verify_stream(name, size):
    doc = STREAMS[name]
    key, info, resp, transcript = _vector_parts(doc)
    if doc["expect_error"] is None:
        v, released = _run_incremental(doc, size)
        assert b"".join(released) == transcript
        ref = verify_stream(key, request=info, status=resp["status"], headers=resp["headers"], transcript=transcript)
        assert v.result == ref
    else:
        with pytest.raises(VerificationError) as e:
            _run_incremental(doc, size)
        assert doc["expect_error"] in str(e.value)


def test_incremental_release_waits_for_each_checkpoint():
    doc = STREAMS["valid-stream"]
    key, info, resp, transcript = _vector_parts(doc)
    evs = events_of(transcript)
    v = StreamVerifier(key, request=info, status=resp["status"], headers=resp["headers"])
    held: list[bytes] = []
    seen_checkpoints = 0
    final = next(i for i, e in enumerate(evs) if e.startswith(b": appliance-final "))
    for e in evs[:final]:
        held.append(e)
        out = v.feed(e)
        if e.startswith(b": appliance-checkpoint "):
            seen_checkpoints += 1
            assert out == held  # everything up to a verified checkpoint is released with it
            held = []
        else:
            assert out == []  # held: no signature covers it yet
    assert seen_checkpoints >= 2 and v.checkpoints == seen_checkpoints
    rest = []
    for e in evs[final:]:
        rest += v.feed(e)
    assert rest == []  # the tail waits for the final checkpoint, [DONE] and the end of the body
    assert v.finish() == held + evs[final:]
    assert evs[-1] == SSE_DONE


def test_incremental_release_stops_at_the_tampering():
    """Events covered by a verified checkpoint may be released; nothing after a tampered one is."""
    doc = STREAMS["tampered-stream-event-changed-after-checkpoint"]
    key, info, resp, transcript = _vector_parts(doc)
    v = StreamVerifier(key, request=info, status=resp["status"], headers=resp["headers"])
    released = v.feed(transcript)
    assert released and released[-1].startswith(b": appliance-checkpoint ")
    with pytest.raises(VerificationError, match="final checkpoint does not match"):
        v.finish()
    with pytest.raises(VerificationError, match="already failed"):
        v.feed(b"data: more\n\n")


def test_stream_verifier_bounds_its_buffers():
    doc = STREAMS["valid-stream"]
    key, info, resp, transcript = _vector_parts(doc)
    v = StreamVerifier(key, request=info, status=resp["status"], headers=resp["headers"], max_event_bytes=64)
    with pytest.raises(VerificationError, match="larger than"):
        v.feed(b"data: " + b"x" * 100)
    v = StreamVerifier(key, request=info, status=resp["status"], headers=resp["headers"], max_bytes=100)
    with pytest.raises(VerificationError, match="larger than"):
        v.feed(transcript)


# ---------------------------------------------------------------------------------------------
# The standard-library path and the CLI, against the app on a loopback socket


class _Quiet(WSGIRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def served():
    env = Env()
    srv = make_server("127.0.0.1", 0, env.app, handler_class=_Quiet)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    env.url = f"http://127.0.0.1:{srv.server_port}"
    yield env
    srv.shutdown()
    srv.server_close()


def test_stdlib_attest_and_verified_request(served):
    a = attest(served.url + "/v1/", policy=ALLOW)
    assert a.base_url == served.url and a.signing_key.public_bytes_raw() == served.identity.public_raw
    body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).encode()
    r = verified_request(a, "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    assert r.status == 200 and r.json()["choices"][0]["text"] == "Hello,"
    body = json.dumps({"model": "tiny", "prompt": "Hi", "stream": True}).encode()
    r = verified_request(a, "POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    evs = list(r.events())
    assert evs[-1] == SSE_DONE and r.stream_result().finish_reason == "stop"
    # with the caller's own Content-Digest: the response binds the body by it
    for stream in (False, True):
        body = json.dumps({"model": "tiny", "prompt": "Hi", "max_tokens": 2, "stream": stream}).encode()
        r = verified_request(a, "POST", "/v1/completions", body=body,
                             headers={"Content-Type": "application/json", "Content-Digest": content_digest(body)})
        assert r.status == 200 and REQUEST_DIGEST_HEADER not in {k.lower() for k in r.headers}
        if stream:
            assert list(r.events())[-1] == SSE_DONE


def _cli(argv, monkeypatch=None, http=None) -> tuple[int, str, str]:
    if http is not None:
        monkeypatch.setattr(att_cli, "_http", lambda timeout: http)
    out, err = io.StringIO(), io.StringIO()
    p = att_cli.add_verify_arguments(__import__("argparse").ArgumentParser())
    code = att_cli.verify_main(p.parse_args(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_cli_verify_prints_the_table_and_exits_by_the_factors(served):
    code, out, _ = _cli([served.url, "--allow-simulated"])
    assert code == 0, out
    assert "provider: simulated (simulated-v1)" in out and "result: OK" in out
    for factor in ("report-data", "nonce", "signing-key", "response-signature"):
        assert factor in out
    code, out, _ = _cli([served.url])
    assert code == 1 and "result: FAILED (provider)" in out


def test_cli_verify_complete(served):
    code, out, _ = _cli([served.url, "--allow-simulated", "--complete", "Hello", "--max-tokens", "3"])
    assert code == 0, out
    assert out.rstrip().endswith("Hello, wörld\nsignature: verified")
    code, out, _ = _cli([served.url, "--allow-simulated", "--complete", "Hello", "--stream"])
    assert code == 0, out
    assert "Hello, wörld!\nsignature: verified (stream" in out


def test_cli_verify_complete_error_answer_exits_1(served):
    code, out, _ = _cli([served.url, "--allow-simulated", "--complete", "Hello", "--model", "nope"])
    assert code == 1 and "HTTP 404" in out


CLI_JSON_CASES = {
    "flip-json-char": lambda: only_for("/v1/completions", lambda req, s, h, d: (s, h, flip(d, b"text"))),
    "strip-signature": lambda: only_for("/v1/completions", JSON_CASES["strip-signature"]),
    "replay": lambda: _replay_first("/v1/completions"),
}


@pytest.mark.parametrize("case", sorted(CLI_JSON_CASES))
def test_cli_verify_complete_detects_tampering(env, monkeypatch, case):
    http = C._HttpxTransportHTTP(Tamper(env.wsgi, CLI_JSON_CASES[case]()))
    if case == "replay":  # the first answer is recorded, and genuine
        code, out, _ = _cli([URL, "--allow-simulated", "--complete", "Hi"], monkeypatch, http)
        assert code == 0 and "Hello" in out
    code, out, _ = _cli([URL, "--allow-simulated", "--complete", "Hi"], monkeypatch, http)
    assert code == 1 and "signature: FAILED" in out and "Hello" not in out


@pytest.mark.parametrize("kind", ["alter", "drop", "truncate"])
def test_cli_verify_stream_detects_tampering(env, monkeypatch, kind):
    def fn(req, s, h, d):
        evs = events_of(d)
        idx = data_events(evs)
        if kind == "alter":
            evs[idx[1]] = flip(evs[idx[1]], b"text")
        elif kind == "drop":
            del evs[idx[1]]
        else:
            evs = evs[: idx[-1] + 1]
        return s, h, b"".join(evs)

    http = C._HttpxTransportHTTP(Tamper(env.wsgi, only_for("/v1/completions", fn)))
    code, out, _ = _cli([URL, "--allow-simulated", "--complete", "Hi", "--stream"], monkeypatch, http)
    assert code == 1 and "signature: FAILED" in out


def test_cli_usage_and_io_errors_exit_2(tmp_path, served):
    bad = tmp_path / "policy.toml"
    bad.write_text("allowed_providers = 3\n")
    assert _cli([served.url, "--policy", str(bad)])[0] == 2
    assert _cli([served.url, "--policy", str(tmp_path / "missing.toml")])[0] == 2
    assert _cli(["ftp://example.com"])[0] == 2
    assert _cli([served.url, "--max-tokens", "0", "--complete", "x"])[0] == 2
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = _cli([f"http://127.0.0.1:{port}", "--timeout", "5"])
    assert code == 2 and "cannot reach" in err


def test_cli_policy_file(tmp_path, served):
    good = tmp_path / "policy.toml"
    good.write_text("allow_simulated = true\nrequired_models = [\"tiny\"]\n")
    code, out, _ = _cli([served.url, "--policy", str(good)])
    assert code == 0 and "models" in out
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({"allow_simulated": True, "binary_sha256": ["00" * 32]}))
    code, out, _ = _cli([served.url, "--policy", str(strict)])
    assert code == 1 and "result: FAILED (binary)" in out


def test_cli_entry_points_know_verify():
    from appliance.cli import build_parser

    args = build_parser().parse_args(["verify", "http://x:1", "--allow-simulated", "--complete", "Hi", "--max-tokens", "4"])
    assert args.command == "verify" and args.allow_simulated and args.complete == "Hi" and args.max_tokens == 4
    out = subprocess.run([sys.executable, "-m", "attestation", "verify", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--allow-simulated" in out.stdout


def test_the_telemetry_policy_digest_is_claimed_and_can_be_pinned(served):
    from appliance.telemetry import policy_sha256

    a = attest(served.url, policy=Policy(allow_simulated=True, telemetry_policy_sha256=(policy_sha256(),)))
    assert a.claims["telemetry_policy_sha256"] == policy_sha256()
    assert ("telemetry-policy", "pass") in [(f.name, f.status) for f in a.factors]
    with pytest.raises(AttestationFailed) as e:
        attest(served.url, policy=Policy(allow_simulated=True, telemetry_policy_sha256=("00" * 32,)))
    assert [f.name for f in e.value.report.failures()] == ["telemetry-policy"]
