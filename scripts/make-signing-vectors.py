#!/usr/bin/env python3
"""Regenerate spec/vectors/signing/: the signing test vectors of spec/signing.md.

    .venv/bin/python scripts/make-signing-vectors.py [--out DIR] [--check]

Deterministic: fixed public test keys, fixed `created` times and fixed nonces, and Ed25519 signatures
are deterministic (RFC 8032), so running it twice writes the same bytes. The signing goes through
the server's own code paths (`appliance.trust.identity.Identity` for response headers,
`appliance.web.streams.SignedStream` for streams) and `attestation.signing.sign_request` for
client requests. `--check` compares with what is on disk instead of writing (exit 1 on a difference).

Keys (published test keys; never use them for anything real):
  * the appliance's identity: RFC 9421 appendix B.1.4 `test-key-ed25519`;
  * the client key `client-1` (request signatures): RFC 8032 section 7.1, TEST 1.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_der_private_key  # noqa: E402
from http_message_signatures import HTTPMessageSigner, algorithms  # noqa: E402

from appliance.trust.identity import Identity  # noqa: E402
from appliance.web.streams import CHECKPOINT_EVERY, GenerationStream, SignedStream, StreamOutcome  # noqa: E402
from attestation import signing as s  # noqa: E402

OUT = ROOT / "spec" / "vectors" / "signing"

# RFC 9421 B.1.4 test-key-ed25519 (PKCS#8 DER, base64) and RFC 8032 7.1 TEST 1 (raw seed, hex).
APPLIANCE_KEY_PKCS8 = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF"
CLIENT_KEY_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"
CLIENT_KEYID = "client-1"
CREATED = 1_700_000_000  # 2023-11-14T22:13:20Z
MODEL = "appliance-test"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def appliance_key() -> Ed25519PrivateKey:
    key = load_der_private_key(base64.b64decode(APPLIANCE_KEY_PKCS8), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def client_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(CLIENT_KEY_SEED))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pub_b64(key: Ed25519PrivateKey) -> str:
    return b64(key.public_key().public_bytes_raw())


def identity(sig_nonce: str) -> Identity:
    return Identity(appliance_key(), clock=lambda: float(CREATED), random_token=lambda: sig_nonce)


def json_bytes(obj) -> bytes:
    return json.dumps(obj).encode()  # what the server's JSON responses look like (default separators)


def sse_event(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def request_doc(info: s.RequestInfo) -> dict:
    doc = {"method": info.method, "target": info.target, "body_b64": b64(info.body)}
    if info.nonce is not None:
        doc["nonce"] = info.nonce
    if info.content_digest is not None:
        doc["content_digest"] = info.content_digest
    return doc


def signature_base(covered: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in covered.items())


# ---------------------------------------------------------------------------------------------
# Responses


def signed_response(info: s.RequestInfo, status: int, body: bytes, *, rid: str, sig_nonce: str, client: str | None = None,
                    bound: s.RequestInfo | None = None):
    """The response as the server signs it; `bound` is what the server binds it to, when that is not
    `info` (a Content-Digest that did not match the body is bound as if none had been sent)."""
    headers = {"X-Request-Id": rid, **SECURITY_HEADERS, "Content-Type": "application/json"}
    if client is not None:
        headers[s.CLIENT_HEADER] = client
    bound = info.without_body() if status == 413 else (bound or info)
    lower = {k.lower(): v for k, v in headers.items()}
    signed = identity(sig_nonce).sign_response(bound, status, lower, body)
    headers["Content-Length"] = str(len(body))
    headers.update(signed)
    return {"status": status, "headers": headers, "body_b64": b64(body)}


def completion_request(nonce: str | None = "client-chosen-nonce-0001", *, client_digest: bool = False) -> s.RequestInfo:
    body = b'{"model": "appliance-test", "prompt": "Say hello", "max_tokens": 8, "seed": 42}'
    return s.RequestInfo("POST", "/v1/completions", body, nonce, s.content_digest(body) if client_digest else None)


def completion_body() -> bytes:
    return json_bytes({
        "id": "cmpl-0123456789abcdef0123456789abcdef",
        "object": "text_completion",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": " Hello, wörld!", "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
    })


def error_body(message: str, type_: str, param=None, code=None) -> bytes:
    return json_bytes({"error": {"message": message, "type": type_, "param": param, "code": code}})


# ---------------------------------------------------------------------------------------------
# Streams


STREAM_WORDS = (
    "The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ";", " then", " it",
    " naps", " in", " the", " sün", " for", " a", " while", ".",
)


def chat_request(nonce: str | None = "client-chosen-nonce-0002", *, client_digest: str | None = None) -> s.RequestInfo:
    body = (
        b'{"model": "appliance-test", "messages": [{"role": "user", "content": "Tell me about a fox."}], '
        b'"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 20}'
    )
    return s.RequestInfo("POST", "/v1/chat/completions", body, nonce, client_digest)


def sha512_digest(body: bytes) -> str:
    return "sha-512=:" + b64(hashlib.sha512(body).digest()) + ":"


def chat_chunks() -> list[bytes]:
    base = {"id": "chatcmpl-fedcba9876543210fedcba9876543210", "object": "chat.completion.chunk", "created": CREATED,
            "model": MODEL, "system_fingerprint": None}
    chunks = [sse_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}]})]
    for w in STREAM_WORDS:
        chunks.append(sse_event({**base, "choices": [{"index": 0, "delta": {"content": w}, "logprobs": None,
                                                      "finish_reason": None}]}))
    chunks.append(sse_event({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]}))
    chunks.append(sse_event({**base, "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32}}))
    chunks.append(s.SSE_DONE)
    return chunks


def signed_stream(info: s.RequestInfo, *, rid: str, sig_nonce: str):
    ident = identity(sig_nonce)
    headers = {"X-Request-Id": rid, **SECURITY_HEADERS, "Content-Type": "text/event-stream",
               "X-Accel-Buffering": "no", s.STREAM_HEADER: s.STREAM_SCHEME}
    lower = {k.lower(): v for k, v in headers.items()}
    signed = ident.sign_response(info, 200, lower, None)
    headers.update(signed)
    # The server yields events in uneven pieces; SignedStream re-frames them, as it does in the server.
    raw = b"".join(chat_chunks())
    pieces = [raw[i : i + 97] for i in range(0, len(raw), 97)]
    # What the generation's body reports when it ends (the values of the chunks above).
    outcome = StreamOutcome("length", {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32})
    body = GenerationStream(iter(pieces), outcome, on_close=lambda: None)
    transcript = b"".join(SignedStream(body, ident, info, signed["Signature"]))
    return {"status": 200, "headers": headers, "body_b64": b64(transcript)}, transcript


def split_events(transcript: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in transcript[:-2].split(b"\n\n")]


def data_index(events: list[bytes], n: int) -> int:
    """The position in `events` of the n-th (0-based) chained data event."""
    seen = -1
    for i, e in enumerate(events):
        if not e.startswith(b":") and e != s.SSE_DONE:
            seen += 1
            if seen == n:
                return i
    raise IndexError(n)


# ---------------------------------------------------------------------------------------------
# Client requests


def client_request(*, body: bytes | None = None, target="/v1/chat/completions", created=CREATED, expires=CREATED + 60,
                   nonce="client-request-nonce-0001") -> dict:
    body = body if body is not None else b'{"model": "appliance-test", "messages": [{"role": "user", "content": "Hi"}]}'
    headers = {"Content-Type": "application/json"}
    headers.update(s.sign_request(
        client_key(), CLIENT_KEYID, method="POST", target=target, body=body,
        created=datetime.datetime.fromtimestamp(created, tz=datetime.UTC),
        expires=datetime.datetime.fromtimestamp(expires, tz=datetime.UTC), nonce=nonce,
    ))
    return {"method": "POST", "target": target, "headers": headers, "body_b64": b64(body)}


# ---------------------------------------------------------------------------------------------


def build() -> dict[str, dict]:
    appliance_pub = pub_b64(appliance_key())
    kid = s.key_id(appliance_key().public_key().public_bytes_raw())
    vectors: dict[str, dict] = {}

    def response_vector(name, description, info, response, expect_error=None, *, verify_as=None, kind="response", extra=None):
        doc = {
            "name": name,
            "description": description,
            "kind": kind,
            "public_key": appliance_pub,
            "expect_error": expect_error,
            "request": request_doc(verify_as or info),
            "response": response,
        }
        if extra:
            doc.update(extra)
        vectors[name] = doc

    def with_headers(response: dict, **changes) -> dict:
        headers = dict(response["headers"])
        for k, v in changes.items():
            name = next((h for h in headers if h.lower() == k.replace("_", "-").lower()), k.replace("_", "-"))
            if v is None:
                headers.pop(name, None)
            else:
                headers[name] = v
        return {**response, "headers": headers}

    # -- keys -------------------------------------------------------------------------------------
    vectors["keys"] = {
        "name": "keys",
        "kind": "keys",
        "description": "The test keys every vector uses. Both are published test keys: never use them for anything real.",
        "appliance": {
            "source": "RFC 9421 appendix B.1.4 test-key-ed25519",
            "private_key_pkcs8_b64": APPLIANCE_KEY_PKCS8,
            "public_key": appliance_pub,
            "kid": kid,
        },
        "client": {
            "source": "RFC 8032 section 7.1 TEST 1",
            "keyid": CLIENT_KEYID,
            "private_seed_hex": CLIENT_KEY_SEED,
            "public_key": pub_b64(client_key()),
        },
    }

    # -- JSON responses ---------------------------------------------------------------------------
    req = completion_request()
    ok = signed_response(req, 200, completion_body(), rid="vec-json-0001", sig_nonce="response-sig-nonce-0001")
    covered = s.verify_response(s.public_key_from_b64(appliance_pub), request=req, status=200, headers=ok["headers"],
                                body=completion_body()).covered
    response_vector("valid-json-response", "A completion (200), bound to a request that sent appliance-nonce and no "
                    "Content-Digest: the body is bound by Appliance-Request-Digest.", req, ok,
                    extra={"signature_base": signature_base(covered)})

    dreq = completion_request("client-chosen-nonce-0008", client_digest=True)
    dok = signed_response(dreq, 200, completion_body(), rid="vec-json-0004", sig_nonce="response-sig-nonce-0008")
    covered = s.verify_response(s.public_key_from_b64(appliance_pub), request=dreq, status=200, headers=dok["headers"],
                                body=completion_body()).covered
    response_vector("valid-json-response-client-digest", "A completion for a request that sent its own Content-Digest: "
                    "the body is bound by \"content-digest\";req, and no Appliance-Request-Digest is sent.", dreq, dok,
                    extra={"signature_base": signature_base(covered)})

    no_nonce_req = completion_request(nonce=None)
    ok_no_nonce = signed_response(no_nonce_req, 200, completion_body(), rid="vec-json-0002", sig_nonce="response-sig-nonce-0002")
    response_vector("valid-json-response-no-nonce", "A completion for a request that sent no appliance-nonce.",
                    no_nonce_req, ok_no_nonce)

    client_req = s.RequestInfo("GET", "/v1/models", b"", "client-chosen-nonce-0003")
    models = json_bytes({"object": "list", "data": [{"id": MODEL, "object": "model", "created": CREATED, "owned_by": "appliance"}]})
    authed = signed_response(client_req, 200, models, rid="vec-json-0003", sig_nonce="response-sig-nonce-0003", client="team-a")
    covered = s.verify_response(s.public_key_from_b64(appliance_pub), request=client_req, status=200,
                                headers=authed["headers"], body=models).covered
    response_vector("valid-json-authenticated-client",
                    "GET /v1/models by the API key named team-a: appliance-client is covered.", client_req, authed,
                    extra={"signature_base": signature_base(covered)})

    err_req = s.RequestInfo("POST", "/v1/chat/completions?trace=1", b'{"model": "missing", "messages": []}', None)
    err = signed_response(err_req, 404, error_body("The model 'missing' does not exist", "invalid_request_error", "model",
                                                   "model_not_found"), rid="vec-err-0001", sig_nonce="response-sig-nonce-0004")
    response_vector("valid-error-response", "An error (404) is signed and bound like any response; the target has a query.",
                    err_req, err)

    unauth_req = s.RequestInfo("POST", "/v1/completions", b'{"model": "appliance-test", "prompt": "x"}', "client-chosen-nonce-0005")
    unauth = signed_response(unauth_req, 401, error_body("Invalid or missing credentials", "authentication_error", None,
                                                         "invalid_api_key"), rid="vec-err-0002", sig_nonce="response-sig-nonce-0005")
    response_vector("valid-error-401", "A refused request (401) is signed too.", unauth_req, unauth)

    big_req = s.RequestInfo("POST", "/v1/completions", b'{"prompt": "' + b"A" * 2048 + b'"}', "client-chosen-nonce-0006")
    too_big = signed_response(big_req, 413, error_body("The request body exceeds 1024 bytes", "invalid_request_error"),
                              rid="vec-err-0003", sig_nonce="response-sig-nonce-0006")
    bad_digest_req = s.RequestInfo("POST", "/v1/completions", b'{"model": "appliance-test", "prompt": "x"}',
                                   "client-chosen-nonce-0009", s.content_digest(b'{"model": "appliance-test", "prompt": "y"}'))
    bad_digest = signed_response(
        bad_digest_req, 400,
        error_body("Content-Digest does not match the request body (RFC 9530: sha-256 and/or sha-512 of the exact bytes sent)",
                   "invalid_request_error", None, "content_digest_mismatch"),
        rid="vec-err-0004", sig_nonce="response-sig-nonce-0009",
        bound=s.RequestInfo(bad_digest_req.method, bad_digest_req.target, bad_digest_req.body, bad_digest_req.nonce),
    )
    response_vector("valid-error-400-content-digest-mismatch",
                    "The client sent a Content-Digest that is not its body's: a 400, bound as if no Content-Digest had "
                    "been sent (Appliance-Request-Digest, the digest of the body received).", bad_digest_req, bad_digest)

    response_vector("valid-error-413-empty-body-binding",
                    "A 413 is bound to the digest of the empty body (the server read none of it); the transcript holds "
                    "the body the client tried to send, and the verifier substitutes the empty body for status 413.",
                    big_req, too_big)

    # -- tampered JSON responses ---------------------------------------------------------------------
    other_body = completion_body().replace(b"Hello", b"Howdy")
    response_vector("tampered-json-body", "The body was changed in transit; Content-Digest kept.", req,
                    {**ok, "body_b64": b64(other_body)}, "content-digest: the body does not match")
    response_vector("tampered-json-body-and-digest", "Body changed and Content-Digest recomputed to match it.", req,
                    with_headers({**ok, "body_b64": b64(other_body)}, content_digest=s.content_digest(other_body)),
                    "signature: does not verify")
    response_vector("tampered-json-status", "The status was changed from 200 to 201.", req, {**ok, "status": 201},
                    "signature: does not verify")
    response_vector("tampered-error-status", "An error's status was changed from 404 to 200.", err_req, {**err, "status": 200},
                    "signature: does not verify")
    response_vector("tampered-json-content-type", "Content-Type changed to text/html.", req,
                    with_headers(ok, content_type="text/html"), "signature: does not verify")
    response_vector("tampered-json-request-id", "X-Request-Id changed (it is covered).", req,
                    with_headers(ok, x_request_id="vec-json-9999"), "signature: does not verify")
    response_vector("tampered-json-client-removed", "appliance-client removed: the verifier no longer expects it, "
                    "but the signature covered it.", client_req, with_headers(authed, appliance_client=None), "signature")
    response_vector("tampered-json-client-changed", "appliance-client changed to another principal.", client_req,
                    with_headers(authed, appliance_client="team-b"), "signature: does not verify")
    response_vector("tampered-json-signature-removed", "Signature and Signature-Input removed.", req,
                    with_headers(ok, signature=None, signature_input=None), "carries no Signature")
    response_vector("tampered-json-wrong-key", "A genuine response checked against another key (the client's).", req, ok,
                    "signature", extra={"public_key": pub_b64(client_key())})
    response_vector("tampered-json-request-digest-changed", "Appliance-Request-Digest changed to another body's digest.",
                    req, with_headers(ok, appliance_request_digest=s.content_digest(b"{}")), "signature: does not verify")
    response_vector("tampered-json-request-digest-removed", "Appliance-Request-Digest removed (the signature covers it).",
                    req, with_headers(ok, appliance_request_digest=None), "appliance-request-digest")
    response_vector("tampered-json-request-digest-added",
                    "An Appliance-Request-Digest added to a response that binds the body by \"content-digest\";req: "
                    "the verifier then requires the signature to cover it.", dreq,
                    with_headers(dok, appliance_request_digest=dreq.body_digest), "appliance-request-digest")

    # Signed by the appliance's key, but covering no request body at all (as an older or broken signer
    # might): it must not verify, whichever way the client sent its body.
    unbound_headers = {k: v for k, v in ok["headers"].items() if k.lower() not in (
        "signature", "signature-input", s.REQUEST_DIGEST_HEADER)}
    msg = s._Resp(200, s._Headers({k.lower(): v for k, v in unbound_headers.items()}), req.message())

    class _ApplianceKey(s._Keys):
        def __init__(self):
            super().__init__(private=appliance_key())

    HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_ApplianceKey()).sign(
        msg, key_id=kid, created=datetime.datetime.fromtimestamp(CREATED, tz=datetime.UTC),
        nonce="response-sig-nonce-0010", label=s.LABEL, tag=s.TAG, use_existing_digest=True,
        covered_component_ids=[c for c in s.response_components(streaming=False, has_nonce=True, has_client=False)
                               if c != s.REQUEST_DIGEST_HEADER],
    )
    unbound = {**ok, "headers": {**unbound_headers, "Signature-Input": msg.headers["signature-input"],
                                 "Signature": msg.headers["signature"]}}
    response_vector("tampered-json-no-body-binding", "Signed by the appliance's key over every component but the "
                    "request body's digest (neither Appliance-Request-Digest nor \"content-digest\";req).", req, unbound,
                    "appliance-request-digest")
    response_vector("tampered-json-no-body-binding-client-digest", "The same, checked by a client that sent a "
                    "Content-Digest.", req, unbound, "content-digest",
                    verify_as=completion_request(req.nonce, client_digest=True))

    def replay(name, description, other: s.RequestInfo, expect):
        response_vector(name, description, req, ok, expect, verify_as=other)

    replay("replay-json-other-body", "The genuine response, presented as the answer to a request with another body.",
           s.RequestInfo(req.method, req.target, req.body.replace(b"Say hello", b"Say goodbye"), req.nonce),
           "appliance-request-digest: not the digest of the body sent")
    other = dreq.body.replace(b"Say hello", b"Say goodbye")
    response_vector("replay-json-client-digest-other-body", "A response bound by \"content-digest\";req, presented as "
                    "the answer to a request with another body (and that body's Content-Digest).", dreq, dok,
                    "signature: does not verify",
                    verify_as=s.RequestInfo(dreq.method, dreq.target, other, dreq.nonce, s.content_digest(other)))
    response_vector("replay-json-client-digest-body-changed", "... to a request with another body but the same "
                    "Content-Digest (a digest that is not of the body sent).", dreq, dok,
                    "the request's Content-Digest does not match its body",
                    verify_as=s.RequestInfo(dreq.method, dreq.target, other, dreq.nonce, dreq.content_digest))
    response_vector("replay-json-client-digest-dropped", "... to the same request sent without a Content-Digest.",
                    dreq, dok, 'Covered header field "content-digest" not found',
                    verify_as=s.RequestInfo(dreq.method, dreq.target, dreq.body, dreq.nonce))
    replay("replay-json-other-path", "... to the same body sent to /completions.",
           s.RequestInfo(req.method, "/completions", req.body, req.nonce), "signature: does not verify")
    replay("replay-json-other-query", "... to the same request with a query string added.",
           s.RequestInfo(req.method, req.target + "?x=1", req.body, req.nonce), "signature: does not verify")
    replay("replay-json-other-method", "... to a PUT instead of a POST.",
           s.RequestInfo("PUT", req.target, req.body, req.nonce), "signature: does not verify")
    replay("replay-json-other-nonce", "... to a request that sent another appliance-nonce.",
           s.RequestInfo(req.method, req.target, req.body, "client-chosen-nonce-9999"), "signature: does not verify")
    replay("replay-json-nonce-dropped", "... to a request that sent no appliance-nonce.",
           s.RequestInfo(req.method, req.target, req.body, None), "appliance-nonce")
    response_vector("replay-json-nonce-stripped",
                    "A response to a request without a nonce, presented to a client that sent one (the nonce was "
                    "stripped on the way in, or the response is an old one).", no_nonce_req, ok_no_nonce,
                    "appliance-nonce", verify_as=req)
    response_vector("replay-error-413-other-path", "The 413's binding still covers method, target and nonce.",
                    big_req, too_big, "signature: does not verify",
                    verify_as=s.RequestInfo("POST", "/v1/chat/completions", big_req.body, big_req.nonce))

    # -- streams ------------------------------------------------------------------------------------------
    sreq = chat_request()
    sresp, transcript = signed_stream(sreq, rid="vec-stream-0001", sig_nonce="response-sig-nonce-0007")
    events = split_events(transcript)
    n_data = sum(1 for e in events if not e.startswith(b":") and e != s.SSE_DONE)
    assert n_data > CHECKPOINT_EVERY and any(e.startswith(s.CHECKPOINT_PREFIX) for e in events)
    chain = s.StreamChain(sresp["headers"]["Signature"])
    heads = [b64(chain.head)]
    for e in events:
        if not e.startswith(b":") and e != s.SSE_DONE:
            chain.add(e)
            heads.append(b64(chain.head))
    covered = s.verify_stream(s.public_key_from_b64(appliance_pub), request=sreq, status=200, headers=sresp["headers"],
                              transcript=transcript)
    response_vector(
        "valid-stream", f"A chat stream: {n_data} data events, checkpoints after data events 1, 2, 4, 8 and every "
        f"{CHECKPOINT_EVERY}th, the final checkpoint, data: [DONE].", sreq, sresp, kind="stream",
        extra={"chain_heads": heads, "request_digest": s.request_digest(sreq), "data_events": n_data,
               "finish_reason": covered.finish_reason, "usage": covered.usage},
    )

    def stream_vector(name, description, new_events: list[bytes], expect, *, verify_as=None, headers=None):
        resp = {**sresp, "body_b64": b64(b"".join(new_events))}
        if headers is not None:
            resp = {**resp, "headers": headers}
        response_vector(name, description, sreq, resp, expect, verify_as=verify_as, kind="stream")

    def changed(e: bytes, old: bytes, new: bytes) -> bytes:
        assert old in e, (old, e)
        return e.replace(old, new, 1)

    def checkpoint_after(i: int) -> int:
        return next(j for j, e in enumerate(events) if j > i and e.startswith(s.CHECKPOINT_PREFIX))

    i3, i18 = data_index(events, 3), data_index(events, 18)
    ev = list(events)
    ev[i3] = changed(ev[i3], b" brown", b" green")
    stream_vector("tampered-stream-event-changed", "Data event 3 changed (before the checkpoint that covers it).", ev,
                  f"checkpoint at event {checkpoint_after(i3)} does not match the events before it")
    ev = list(events)
    ev[i18] = changed(ev[i18], b"\"content\":\" a\"", b"\"content\":\" one\"")
    stream_vector("tampered-stream-event-changed-after-checkpoint", "Data event 18 changed (after the checkpoint).", ev,
                  "final checkpoint does not match")
    ev = list(events)
    del ev[data_index(events, 5)]
    stream_vector("tampered-stream-event-dropped", "Data event 5 dropped.", ev, "does not match the events before it")
    ev = list(events)
    del ev[data_index(events, 19)]
    stream_vector("tampered-stream-event-dropped-after-checkpoint", "Data event 19 dropped.", ev,
                  "final checkpoint does not match")
    ev = list(events)
    a, b = data_index(events, 7), data_index(events, 8)
    ev[a], ev[b] = ev[b], ev[a]
    stream_vector("tampered-stream-events-reordered", "Data events 7 and 8 swapped.", ev, "does not match the events before it")
    extra_event = events[i18]
    fin = next(i for i, e in enumerate(events) if e.startswith(s.FINAL_PREFIX))
    ev = list(events)
    ev.insert(fin + 1, extra_event)
    stream_vector("tampered-stream-event-appended-after-final", "A data event inserted between the final checkpoint and "
                  "data: [DONE].", ev, "events after the final checkpoint")
    stream_vector("tampered-stream-event-appended-after-done", "A data event appended after data: [DONE].",
                  events + [extra_event], "events after the final checkpoint")
    stream_vector("tampered-stream-truncated", "The stream cut after data event 19: no final checkpoint.",
                  events[: data_index(events, 19) + 1], "truncated (no final checkpoint)")
    stream_vector("tampered-stream-truncated-before-done", "The final checkpoint arrived but data: [DONE] did not.",
                  events[: fin + 1], "events after the final checkpoint")
    cut = b"".join(events[: data_index(events, 10)]) + events[data_index(events, 10)][:40]
    stream_vector("tampered-stream-truncated-mid-event", "The stream cut in the middle of an event.", [cut],
                  "truncated (does not end with a complete event)")
    # Forged checkpoint: event 3 changed and the covering checkpoint's chain recomputed (anyone can),
    # signature kept.
    ev = list(events)
    ev[i3] = changed(ev[i3], b" brown", b" green")
    cp = checkpoint_after(i3)
    forged = s.StreamChain(sresp["headers"]["Signature"])
    for e in ev[:cp]:
        if not e.startswith(b":"):
            forged.add(e)
    old = json.loads(ev[cp][len(s.CHECKPOINT_PREFIX) :])
    old["chain"] = b64(forged.head)
    ev[cp] = s.CHECKPOINT_PREFIX + s._canonical(old) + b"\n\n"
    stream_vector("tampered-stream-forged-checkpoint", "Event 3 changed and the checkpoint covering it recomputed to "
                  "match; its signature cannot be.", ev, f"bad signature on the checkpoint at event {cp}")
    ev = list(events)
    ev[fin] = changed(ev[fin], b'"finish_reason":"length"', b'"finish_reason":"stop"')
    stream_vector("tampered-stream-final-finish-reason", "The final checkpoint's finish_reason changed.", ev,
                  "bad signature on the final checkpoint")
    ev = list(events)
    del ev[fin]
    stream_vector("tampered-stream-final-removed", "The final checkpoint removed, data: [DONE] kept.", ev,
                  "data: [DONE] before the final checkpoint")
    stream_vector("replay-stream-other-body", "The genuine stream, presented as the answer to a request with another body.",
                  events, "appliance-request-digest: not the digest of the body sent",
                  verify_as=s.RequestInfo(sreq.method, sreq.target, sreq.body.replace(b"fox", b"cat"), sreq.nonce))
    stream_vector("replay-stream-other-nonce", "... to a request with another appliance-nonce.", events,
                  "signature: does not verify",
                  verify_as=s.RequestInfo(sreq.method, sreq.target, sreq.body, "client-chosen-nonce-9999"))
    hdrs = dict(sresp["headers"])
    hdrs.pop(s.STREAM_HEADER)
    stream_vector("tampered-stream-header-removed", "The appliance-stream header removed.", events, "appliance-stream",
                  headers=hdrs)

    # A stream for a request that sent its own Content-Digest (sha-512 here): the header signature covers
    # "content-digest";req; the final checkpoint's request digest still uses sha-256 of the body (§3.4).
    dsreq = chat_request("client-chosen-nonce-0010", client_digest=sha512_digest(chat_request().body))
    dsresp, dtranscript = signed_stream(dsreq, rid="vec-stream-0002", sig_nonce="response-sig-nonce-0011")
    dcovered = s.verify_stream(s.public_key_from_b64(appliance_pub), request=dsreq, status=200, headers=dsresp["headers"],
                               transcript=dtranscript)
    response_vector("valid-stream-client-digest", "The chat stream for a request that sent Content-Digest (sha-512): the "
                    "header signature covers \"content-digest\";req.", dsreq, dsresp, kind="stream",
                    extra={"request_digest": s.request_digest(dsreq), "data_events": len(dcovered.events),
                           "finish_reason": dcovered.finish_reason, "usage": dcovered.usage})
    other = dsreq.body.replace(b"fox", b"cat")
    response_vector("replay-stream-client-digest-other-body", "That stream, presented as the answer to a request with "
                    "another body and its Content-Digest.", dsreq, dsresp, "signature: does not verify",
                    verify_as=s.RequestInfo(dsreq.method, dsreq.target, other, dsreq.nonce, sha512_digest(other)),
                    kind="stream")

    # -- client request signatures ---------------------------------------------------------------------------
    keys = {CLIENT_KEYID: pub_b64(client_key())}

    def client_vector(name, description, requests, now, expect=None, *, window=300, client_keys=None):
        vectors[name] = {
            "name": name,
            "description": description,
            "kind": "client-request",
            "client_keys": client_keys or keys,
            "window": window,
            "now": now,
            "expect_error": expect,
            "requests": requests,
        }

    creq = client_request()
    client_vector("valid-client-request", "A signed POST /v1/chat/completions, checked 5 s after it was made.", [creq], CREATED + 5)
    client_vector("tampered-client-request-expired", "Checked after its expires time.", [creq], CREATED + 61,
                  "expired or not yet valid")
    client_vector("tampered-client-request-not-yet-valid", "Checked more than the window before its created time.", [creq],
                  CREATED - 301, "expired or not yet valid")
    client_vector("tampered-client-request-window-too-long", "expires - created (3600 s) exceeds the window (300 s).",
                  [client_request(expires=CREATED + 3600, nonce="client-request-nonce-0002")], CREATED + 5,
                  "longer than the allowed window")
    client_vector("tampered-client-request-replayed", "The same signed request sent twice (same keyid and nonce).",
                  [creq, creq], CREATED + 5, "replayed")
    changed_body = {**creq, "body_b64": b64(base64.b64decode(creq["body_b64"]).replace(b"Hi", b"Ho"))}
    client_vector("tampered-client-request-body-changed", "The body changed, Content-Digest kept.", [changed_body], CREATED + 5,
                  "body does not match Content-Digest")
    new_body = base64.b64decode(changed_body["body_b64"])
    redigested = {**changed_body, "headers": {**creq["headers"], "Content-Digest": s.content_digest(new_body)}}
    client_vector("tampered-client-request-body-and-digest-changed", "The body changed and Content-Digest recomputed.",
                  [redigested], CREATED + 5, "request signature: does not verify")
    client_vector("tampered-client-request-path-changed", "Sent to /v1/completions instead of the signed path.",
                  [{**creq, "target": "/v1/completions"}], CREATED + 5, "request signature: does not verify")
    client_vector("tampered-client-request-unknown-keyid", "Signed by a key the verifier does not know.", [creq],
                  CREATED + 5, "unknown key id", client_keys={"someone-else": pub_b64(client_key())})
    return vectors


def render(doc: dict) -> bytes:
    return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = p.parse_args(argv)
    vectors = build()
    if args.check:
        bad = [n for n, d in vectors.items() if not (args.out / f"{n}.json").is_file()
               or (args.out / f"{n}.json").read_bytes() != render(d)]
        extra = sorted({f.stem for f in args.out.glob("*.json")} - set(vectors))
        for n in bad:
            print(f"differs or missing: {n}.json", file=sys.stderr)
        for n in extra:
            print(f"not generated by this script: {n}.json", file=sys.stderr)
        return 1 if bad or extra else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.json"):
        if old.stem not in vectors:
            old.unlink()
    for name, doc in vectors.items():
        (args.out / f"{name}.json").write_bytes(render(doc))
    print(f"wrote {len(vectors)} vectors to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
