"""The trust layer against the real server: signed JSON, errors and streams verified with
`attestation.signing` and the key from `/v1/keys`; replay and tampering detected; the transcript CLI;
API keys and client request signatures on a keyed server; and a log scan for secrets.

Requests are sent with exact bytes (raw `requests`, or the bytes the openai client put on the wire,
read back from its httpx request), since the response signature binds the request body's digest.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import secrets
import subprocess
import sys
import time
import uuid

import openai
import pytest
import requests
from appliance_it import ROOT, server_command
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation import signing

pytestmark = pytest.mark.integration

MAX_AGE = datetime.timedelta(minutes=5)


# ---------------------------------------------------------------------------------------------
# Helpers


def public_key(server) -> tuple[str, object]:
    r = server.get("/v1/keys")
    assert r.status_code == 200, r.text
    keys = r.json()
    pk = signing.public_key_from_b64(keys["public_key"])
    assert keys["kid"] == signing.key_id(pk.public_bytes_raw())
    # /v1/keys is itself signed by the key it publishes
    signing.verify_response(pk, request=signing.RequestInfo("GET", "/v1/keys"), status=200, headers=dict(r.headers),
                            body=r.content, max_age=MAX_AGE)
    return keys["public_key"], pk


def send(server, method: str, target: str, body: bytes = b"", *, nonce: str | None = None, headers=None,
         stream: bool = False) -> tuple[requests.Response, bytes, signing.RequestInfo]:
    """Send exact bytes; return the response, its raw body (a stream read to the end) and what it answers."""
    h = {"Connection": "close", **(headers or {})}
    if body:
        h.setdefault("Content-Type", "application/json")
    if nonce is not None:
        h[signing.NONCE_HEADER] = nonce
    r = requests.request(method, server.url + target, data=body or None, headers=h, timeout=120, stream=stream)
    raw = b"".join(r.iter_content(chunk_size=None)) if stream else r.content
    digest = next((v for k, v in h.items() if k.lower() == "content-digest"), None)
    return r, raw, signing.RequestInfo(method, target, body, nonce, digest)


def verify(pk, info: signing.RequestInfo, r: requests.Response, raw: bytes):
    common = dict(request=info, status=r.status_code, headers=dict(r.headers), max_age=MAX_AGE)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return signing.verify_stream(pk, transcript=raw, **common)
    return signing.verify_response(pk, body=raw, **common)


def from_httpx(http_response, raw: bytes | None = None):
    """(RequestInfo, status, headers, body) from what an openai client actually sent and received."""
    req = http_response.request
    info = signing.RequestInfo(req.method, req.url.raw_path.decode(), req.content, req.headers.get(signing.NONCE_HEADER))
    return info, http_response.status_code, dict(http_response.headers), http_response.content if raw is None else raw


def transcript(info: signing.RequestInfo, status: int, headers: dict, body: bytes) -> dict:
    req = {"method": info.method, "target": info.target, "body_b64": base64.b64encode(info.body).decode()}
    if info.nonce is not None:
        req["nonce"] = info.nonce
    if info.content_digest is not None:
        req["content_digest"] = info.content_digest
    return {"request": req, "response": {"status": status, "headers": dict(headers),
                                         "body_b64": base64.b64encode(body).decode()}}


def tamper_event(raw: bytes) -> bytes:
    """Change one data event's text (a content delta in the middle of the stream)."""
    events = raw[:-2].split(b"\n\n")
    data = [i for i, e in enumerate(events) if e.startswith(b"data: {")]
    i = data[len(data) // 2]
    obj = json.loads(events[i][6:])
    choice = obj["choices"][0]
    if "delta" in choice:
        choice["delta"]["content"] = (choice["delta"].get("content") or "") + "!"
    else:
        choice["text"] = (choice.get("text") or "") + "!"
    events[i] = b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()
    out = b"\n\n".join(events) + b"\n\n"
    assert out != raw
    return out


COMPLETION = json.dumps({"model": "m", "prompt": "The capital of France is", "max_tokens": 8, "seed": 1}).encode()
CHAT_STREAM = json.dumps({
    "model": "m", "messages": [{"role": "user", "content": "Count to ten."}], "max_tokens": 40, "stream": True,
    "stream_options": {"include_usage": True}, "seed": 2,
}).encode()


# ---------------------------------------------------------------------------------------------
# Every response type verifies


def test_json_completion_chat_error_and_stream_verify(server):
    _, pk = public_key(server)
    nonce = secrets.token_urlsafe(16)

    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION, nonce=nonce)
    assert r.status_code == 200, r.text
    v = verify(pk, info, r, raw)
    assert v.covered['"appliance-nonce";req'] == nonce
    assert v.covered['"appliance-request-digest"'] == signing.content_digest(COMPLETION)  # no Content-Digest sent
    assert r.headers["Appliance-Request-Digest"] == signing.content_digest(COMPLETION)
    assert r.headers["Content-Digest"] == signing.content_digest(raw)

    # the client's own Content-Digest: checked, and the body bound by it instead
    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION, nonce=nonce,
                        headers={"Content-Digest": signing.content_digest(COMPLETION)})
    assert r.status_code == 200, r.text
    v = verify(pk, info, r, raw)
    assert v.covered['"content-digest";req'] == signing.content_digest(COMPLETION)
    assert "Appliance-Request-Digest" not in r.headers
    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION, nonce=nonce,
                        headers={"Content-Digest": signing.content_digest(COMPLETION + b" ")})
    assert r.status_code == 400 and "Content-Digest" in r.json()["error"]["message"]
    verify(pk, info, r, raw)

    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}).encode()
    r, raw, info = send(server, "POST", "/v1/chat/completions", chat)
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"
    verify(pk, info, r, raw)

    for target, body, status in [
        ("/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
        ("/v1/completions", b'{"model": "m", "prompt": ', 400),
        ("/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode(), 400),
        ("/nowhere?x=1", b"", 404),
    ]:
        r, raw, info = send(server, "POST" if body else "GET", target, body, nonce=nonce)
        assert r.status_code == status, (target, r.text)
        assert set(r.json()) == {"error"}
        verify(pk, info, r, raw)

    r, raw, info = send(server, "POST", "/v1/chat/completions", CHAT_STREAM, nonce=nonce, stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.headers[signing.STREAM_HEADER] == signing.STREAM_SCHEME
    v = verify(pk, info, r, raw)
    assert v.finish_reason in ("stop", "length") and v.usage["completion_tokens"] >= 1
    assert raw.endswith(b"\n\n" + signing.SSE_DONE) and signing.FINAL_PREFIX in raw
    if len(v.events) > 16:
        assert signing.CHECKPOINT_PREFIX in raw


def test_long_stream_has_checkpoints_and_verifies(server):
    _, pk = public_key(server)
    body = json.dumps({"model": "m", "prompt": "Once upon a time", "max_tokens": 40, "stream": True,
                       "ignore_eos": True, "seed": 3}).encode()
    r, raw, info = send(server, "POST", "/v1/completions", body, stream=True)
    assert r.status_code == 200, raw[:500]
    v = verify(pk, info, r, raw)
    assert len(v.events) > 16
    # after data events 1, 2, 4, 8, then every 16th
    assert raw.count(signing.CHECKPOINT_PREFIX) == 4 + len(v.events) // 16


def test_target_is_bound_as_sent(server):
    """Query strings, a trailing slash, and characters a URI may not hold: all signed and bound as sent."""
    _, pk = public_key(server)
    for target in ("/v1/models?limit=2&x=%20y", "/v1/models/", "/v1/models?q=a|b{c}"):
        if "|" in target:  # requests would re-quote it: send it raw
            import http.client

            conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
            conn.request("GET", target, headers={"Connection": "close"})
            resp = conn.getresponse()
            raw, status, headers = resp.read(), resp.status, dict(resp.getheaders())
            conn.close()
            info = signing.RequestInfo("GET", target)
            signing.verify_response(pk, request=info, status=status, headers=headers, body=raw, max_age=MAX_AGE)
            assert status == 200
            continue
        r, raw, info = send(server, "GET", target)
        assert r.status_code == 200, target
        verify(pk, info, r, raw)
        with pytest.raises(signing.VerificationError):
            verify(pk, signing.RequestInfo("GET", "/v1/models"), r, raw)


def test_openai_client_responses_verify(server):
    _, pk = public_key(server)
    with server.openai() as client:
        raw = client.completions.with_raw_response.create(
            model="m", prompt="Hello", max_tokens=8, extra_headers={signing.NONCE_HEADER: "openai-nonce-1"}
        )
        assert raw.parse().choices[0].text is not None
        info, status, headers, body = from_httpx(raw.http_response)
        assert info.nonce == "openai-nonce-1" and info.body  # the exact bytes the client sent
        signing.verify_response(pk, request=info, status=status, headers=headers, body=body, max_age=MAX_AGE)

        raw = client.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                               max_tokens=8)
        assert raw.parse().choices[0].message.role == "assistant"
        info, status, headers, body = from_httpx(raw.http_response)
        signing.verify_response(pk, request=info, status=status, headers=headers, body=body, max_age=MAX_AGE)

        with client.chat.completions.with_streaming_response.create(
            model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=24, stream=True,
        ) as resp:
            data = b"".join(resp.iter_bytes())
            info, status, headers, body = from_httpx(resp.http_response, data)
        v = signing.verify_stream(pk, request=info, status=status, headers=headers, transcript=body, max_age=MAX_AGE)
        assert v.finish_reason

        # The client parses the signed stream as usual: the checkpoint comment lines are invisible to it.
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=24, stream=True))
        assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")

        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="missing", prompt="x", max_tokens=1)
        err = e.value.response
        info, status, headers, body = from_httpx(err)
        signing.verify_response(pk, request=info, status=status, headers=headers, body=body, max_age=MAX_AGE)


# ---------------------------------------------------------------------------------------------
# Replay and tampering


def test_response_replayed_against_another_request_fails(server):
    _, pk = public_key(server)
    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION, nonce="replay-nonce-1")
    verify(pk, info, r, raw)
    other_body = COMPLETION.replace(b"France", b"Spain")
    for other, why in (
        (signing.RequestInfo("POST", "/v1/completions", other_body, "replay-nonce-1"), "appliance-request-digest"),  # another prompt
        (signing.RequestInfo("POST", "/completions", COMPLETION, "replay-nonce-1"), "signature"),  # another route
        (signing.RequestInfo("POST", "/v1/completions", COMPLETION, "replay-nonce-2"), "signature"),  # another nonce
        (signing.RequestInfo("POST", "/v1/completions", COMPLETION, None), "signature"),  # a client that sent no nonce
        (signing.RequestInfo("POST", "/v1/completions", COMPLETION + b" ", "replay-nonce-1"), "appliance-request-digest"),  # one byte more
    ):
        with pytest.raises(signing.VerificationError, match=why):
            verify(pk, other, r, raw)
    # and an identical second request gets a different answer-binding only through its nonce: without one,
    # the same request is the same binding (a client that cares sends a fresh nonce every time)
    r2, raw2, info2 = send(server, "POST", "/v1/completions", COMPLETION, nonce="replay-nonce-2")
    verify(pk, info2, r2, raw2)
    with pytest.raises(signing.VerificationError):
        verify(pk, info, r2, raw2)


def test_tampered_response_fails(server):
    _, pk = public_key(server)
    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION)
    verify(pk, info, r, raw)
    headers = dict(r.headers)

    class Fake:
        def __init__(self, status=r.status_code, hdrs=headers):
            self.status_code, self.headers = status, hdrs

    with pytest.raises(signing.VerificationError, match="content-digest"):
        verify(pk, info, Fake(), raw.replace(b'"text"', b'"text" ', 1))
    with pytest.raises(signing.VerificationError, match="signature"):
        verify(pk, info, Fake(status=201), raw)
    with pytest.raises(signing.VerificationError, match="signature"):
        verify(pk, info, Fake(hdrs={**headers, "Content-Type": "text/plain"}), raw)


def test_altered_sse_event_fails(server):
    _, pk = public_key(server)
    r, raw, info = send(server, "POST", "/v1/chat/completions", CHAT_STREAM, stream=True)
    verify(pk, info, r, raw)
    with pytest.raises(signing.VerificationError, match="does not match"):
        verify(pk, info, r, tamper_event(raw))
    events = raw[:-2].split(b"\n\n")
    data = [i for i, e in enumerate(events) if e.startswith(b"data: {")]
    dropped = b"\n\n".join(e for i, e in enumerate(events) if i != data[1]) + b"\n\n"
    with pytest.raises(signing.VerificationError, match="does not match"):
        verify(pk, info, r, dropped)
    fin = next(i for i, e in enumerate(events) if e.startswith(signing.FINAL_PREFIX))
    with pytest.raises(signing.VerificationError, match="truncated"):
        verify(pk, info, r, b"\n\n".join(events[:fin]) + b"\n\n")
    with pytest.raises(signing.VerificationError, match="appliance-request-digest"):
        verify(pk, signing.RequestInfo("POST", "/v1/chat/completions", CHAT_STREAM.replace(b"ten", b"six")), r, raw)


# ---------------------------------------------------------------------------------------------
# The transcript CLI


def run_cli(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_verify_response_cli(server, tmp_path):
    key_b64, pk = public_key(server)
    r, raw, info = send(server, "POST", "/v1/completions", COMPLETION, nonce="cli-nonce")
    good = tmp_path / "json.json"
    good.write_text(json.dumps(transcript(info, r.status_code, dict(r.headers), raw)))
    bad = tmp_path / "json-tampered.json"
    bad.write_text(json.dumps(transcript(info, r.status_code, dict(r.headers), raw.replace(b"text", b"txet", 1))))

    rs, rawstream, sinfo = send(server, "POST", "/v1/chat/completions", CHAT_STREAM, stream=True)
    stream_good = tmp_path / "stream.json"
    stream_good.write_text(json.dumps(transcript(sinfo, rs.status_code, dict(rs.headers), rawstream)))
    stream_bad = tmp_path / "stream-tampered.json"
    stream_bad.write_text(json.dumps(transcript(sinfo, rs.status_code, dict(rs.headers), tamper_event(rawstream))))
    replayed = tmp_path / "replayed.json"
    other = signing.RequestInfo(info.method, info.target, info.body, "another-nonce")
    replayed.write_text(json.dumps(transcript(other, r.status_code, dict(r.headers), raw)))
    # a request that sent its own Content-Digest: the transcript records it (request.content_digest)
    rd, rawd, dinfo = send(server, "POST", "/v1/completions", COMPLETION, nonce="cli-nonce-2",
                           headers={"Content-Digest": signing.content_digest(COMPLETION)})
    digest_good = tmp_path / "json-client-digest.json"
    digest_good.write_text(json.dumps(transcript(dinfo, rd.status_code, dict(rd.headers), rawd)))
    digest_dropped = tmp_path / "json-client-digest-dropped.json"
    dropped = signing.RequestInfo(dinfo.method, dinfo.target, dinfo.body, dinfo.nonce)
    digest_dropped.write_text(json.dumps(transcript(dropped, rd.status_code, dict(rd.headers), rawd)))

    appliance_cli = [*server_command(), "verify-response"]
    module_cli = [sys.executable, "-m", "attestation", "verify-response"]
    for cli in (appliance_cli, module_cli):
        for path in (good, stream_good, digest_good):
            out = run_cli([*cli, str(path), "--public-key", key_b64])
            assert out.returncode == 0, (cli, path.name, out.stdout, out.stderr)
            assert "OK" in out.stdout and signing.key_id(pk.public_bytes_raw()) in out.stdout
        for path, why in ((bad, "content-digest"), (stream_bad, "does not match"), (replayed, "signature"),
                          (digest_dropped, "content-digest")):
            out = run_cli([*cli, str(path), "--public-key", key_b64])
            assert out.returncode == 1, (cli, path.name, out.stdout, out.stderr)
            assert "FAILED" in out.stderr and why in out.stderr
    # another appliance's key: fails
    other_key = base64.b64encode(Ed25519PrivateKey.generate().public_key().public_bytes_raw()).decode()
    assert run_cli([*module_cli, str(good), "--public-key", other_key]).returncode == 1
    # not a transcript: 2
    junk = tmp_path / "junk.json"
    junk.write_text("{}")
    assert run_cli([*module_cli, str(junk), "--public-key", key_b64]).returncode == 2


# ---------------------------------------------------------------------------------------------
# A keyed server: API keys, client request signatures, and the log scan


API_KEY = "sk-e2e-" + secrets.token_urlsafe(24)
ADMIN_KEY = "sk-e2e-admin-" + secrets.token_urlsafe(24)
CLIENT = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def keyed(start_server, model_files):
    client_pub = base64.b64encode(CLIENT.public_key().public_bytes_raw()).decode()
    config = f"""
[server]
log_level = "debug"

[[auth.api_keys]]
name = "e2e"
sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"
scopes = ["inference"]

[[auth.api_keys]]
name = "e2e-admin"
sha256 = "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"
scopes = ["admin"]

[[auth.client_keys]]
keyid = "e2e-client"
public_key = "{client_pub}"
scopes = ["inference"]
"""
    server = start_server(models={"m": model_files.main}, config=config, name="keyed")
    yield server
    server.stop()


def test_keyed_server_refuses_without_the_key_and_accepts_with_it(keyed):
    _, pk = public_key(keyed)
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
        r, raw, info = send(keyed, "POST", "/v1/completions", COMPLETION, headers=headers)
        assert r.status_code in (401, 403), (headers, r.text)
        assert r.json()["error"]["type"] in ("authentication_error", "permission_error")
        verify(pk, info, r, raw)
        assert API_KEY not in r.text
    r, raw, info = send(keyed, "POST", "/v1/completions", COMPLETION, headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    v = verify(pk, info, r, raw)
    assert r.headers["appliance-client"] == "e2e" and v.covered['"appliance-client"'] == "e2e"
    # scopes: the inference key cannot reach admin routes, the admin key can
    r, raw, info = send(keyed, "GET", "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 403
    verify(pk, info, r, raw)
    r, raw, info = send(keyed, "GET", "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and "appliance_auth_failures_total" in r.text
    verify(pk, info, r, raw)
    # the official client, with the key
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120.0) as client:
        out = client.completions.create(model="m", prompt="Hi", max_tokens=4)
        assert out.choices[0].text is not None
    with openai.OpenAI(base_url=keyed.url + "/v1", api_key="sk-wrong", max_retries=0, timeout=120.0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.completions.create(model="m", prompt="Hi", max_tokens=4)


def test_keyed_server_signed_client_requests(keyed):
    _, pk = public_key(keyed)
    now = int(time.time())
    target = "/v1/completions"
    headers = {"Content-Type": "application/json", **signing.sign_request(
        CLIENT, "e2e-client", method="POST", target=target, body=COMPLETION,
        created=datetime.datetime.fromtimestamp(now, tz=datetime.UTC),
        expires=datetime.datetime.fromtimestamp(now + 60, tz=datetime.UTC), nonce=uuid.uuid4().hex,
    )}
    r, raw, info = send(keyed, "POST", target, COMPLETION, headers=headers)
    assert r.status_code == 200, r.text
    v = verify(pk, info, r, raw)
    assert v.covered['"appliance-client"'] == "e2e-client"
    r, raw, info = send(keyed, "POST", target, COMPLETION, headers=headers)  # replayed
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    verify(pk, info, r, raw)
    tampered = COMPLETION.replace(b"France", b"Italy")
    # the body changed under the signature: its Content-Digest no longer matches, a 400 before authentication
    r, raw, info = send(keyed, "POST", target, tampered, headers=headers)
    assert r.status_code == 400 and "Content-Digest" in r.json()["error"]["message"]
    verify(pk, info, r, raw)
    # ... and with the digest recomputed too, the signature no longer verifies: the generic 401
    r, raw, info = send(keyed, "POST", target, tampered, headers={**headers, "Content-Digest": signing.content_digest(tampered)})
    assert r.status_code == 401
    verify(pk, info, r, raw)


def test_logs_never_hold_prompts_completions_or_keys(keyed):
    marker = "SECRET-MARKER-" + uuid.uuid4().hex
    wrong_key = "sk-" + marker + "-wrongkey"
    auth = {"Authorization": f"Bearer {API_KEY}"}
    completions: list[str] = []

    body = json.dumps({"model": "m", "prompt": f"Remember {marker} forever.", "max_tokens": 24, "seed": 5}).encode()
    r, _, _ = send(keyed, "POST", "/v1/completions", body, headers=auth)
    assert r.status_code == 200
    completions.append(r.json()["choices"][0]["text"])
    chat = json.dumps({"model": "m", "messages": [{"role": "system", "content": marker}, {"role": "user", "content": marker}],
                       "max_tokens": 24, "stream": True}).encode()
    r, raw, _ = send(keyed, "POST", "/v1/chat/completions", chat, headers=auth, stream=True)
    assert r.status_code == 200
    completions.append("".join(
        (json.loads(e[6:])["choices"][0]["delta"].get("content") or "")
        for e in raw.split(b"\n\n") if e.startswith(b"data: {") and json.loads(e[6:])["choices"]
    ))
    # refused and failing requests that carry the marker in a key, a body, a bad field, a header
    send(keyed, "POST", "/v1/completions", body, headers={"Authorization": f"Bearer {wrong_key}"})
    send(keyed, "POST", "/v1/completions", f'{{"prompt": "{marker}", '.encode(), headers=auth)
    send(keyed, "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": marker}).encode(), headers=auth)
    send(keyed, "POST", "/v1/completions", json.dumps({"model": marker, "prompt": marker}).encode(), headers=auth)
    send(keyed, "POST", "/v1/completions", marker.encode(), headers={**auth, "Content-Type": "text/plain"})
    send(keyed, "POST", "/v1/completions", body, headers={**auth, "X-Request-Id": "rid-ok", "User-Agent": marker})
    send(keyed, "POST", "/v1/completions", (marker * 100000).encode(), headers=auth)  # 413
    time.sleep(0.5)  # let the access log lines land

    logs = keyed.stdout() + keyed.stderr()
    assert '"route": "/v1/completions"' in logs or '"route":"/v1/completions"' in logs, logs[-2000:]  # logs were captured
    assert marker not in logs
    assert API_KEY not in logs and ADMIN_KEY not in logs
    assert hashlib.sha256(API_KEY.encode()).hexdigest() not in logs
    for text in completions:
        if len(text.strip()) >= 24:  # long enough not to occur in a log line by chance
            assert text not in logs
