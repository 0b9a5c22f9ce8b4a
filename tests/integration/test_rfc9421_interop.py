"""The appliance's response signatures, checked by a second RFC 9421 implementation.

`http-message-signatures`' own `HTTPMessageVerifier` verifies each response exactly as `requests`
received it: the response's status and headers, and `response.request`, the request as `requests`
sent it (its method, URL and headers: a `Content-Digest` only when the test sent one). It is told
nothing about this appliance: no required components, no tag, no label, no request adapters; the key
comes from `/v1/keys` (JWK, by `keyid`). Nothing of `attestation.signing` is used here.

What the RFCs leave to the application is then checked from spec/signing.md alone: the covered
components are exactly §2.2's list; the request body is bound either by `"content-digest";req` (the
request's own RFC 9530 field) or by `Appliance-Request-Digest`, an RFC 9530 value that must be the
digest of the bytes sent; and for streams, the final checkpoint (§3.4) is rebuilt with hashlib and
checked with the raw Ed25519 key.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from http_message_signatures import HTTPMessageVerifier, algorithms
from http_message_signatures.digests import ContentDigest
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from http_message_signatures.resolvers import HTTPSignatureKeyResolver

pytestmark = pytest.mark.integration

EMPTY_SHA256 = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
COMPLETION = json.dumps({"model": "m", "prompt": "The capital of France is", "max_tokens": 6, "seed": 1}).encode()
CHAT_STREAM = json.dumps({
    "model": "m", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 12, "stream": True,
    "stream_options": {"include_usage": True}, "seed": 2,
}).encode()


def sha256_field(body: bytes) -> str:
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode() + ":"


def sha512_field(body: bytes) -> str:
    return "sha-512=:" + base64.b64encode(hashlib.sha512(body).digest()).decode() + ":"


DIGESTS = {"none": None, "sha-256": sha256_field, "sha-512": sha512_field}


class JWKSet(HTTPSignatureKeyResolver):
    """RFC 9421 key resolution: the keyid names a key of the set; no other key verifies."""

    def __init__(self, jwks: list[dict]) -> None:
        self.keys = {}
        for jwk in jwks:
            assert jwk["kty"] == "OKP" and jwk["crv"] == "Ed25519"
            x = base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4))
            self.keys[jwk["kid"]] = Ed25519PublicKey.from_public_bytes(x)

    def resolve_public_key(self, key_id: str):
        return self.keys[key_id]


@pytest.fixture(scope="module")
def keys(server) -> JWKSet:
    r = requests.get(server.url + "/v1/keys", headers={"Connection": "close"}, timeout=30)
    assert r.status_code == 200, r.text
    keys = JWKSet(r.json()["keys"])
    rfc9421_verify(keys, r, body=r.content)  # /v1/keys is signed by the key it publishes
    return keys


def rfc9421_verify(keys: JWKSet, response: requests.Response, *, body: bytes | None):
    """The library's verifier on the response as received; `body` (JSON responses) also has it check
    the response's signed Content-Digest against the body bytes."""
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=keys)
    (result,) = verifier.verify(response, body=body)
    return result


def send(server, method: str, target: str, body: bytes = b"", *, digest=None, nonce: str | None = None,
         stream: bool = False) -> tuple[requests.Response, bytes]:
    headers = {"Connection": "close"}
    if body:
        headers["Content-Type"] = "application/json"
    if digest is not None:
        headers["Content-Digest"] = digest if isinstance(digest, str) else digest(body)
    if nonce is not None:
        headers["appliance-nonce"] = nonce
    r = requests.request(method, server.url + target, data=body or None, headers=headers, stream=stream, timeout=120)
    raw = b"".join(r.iter_content(chunk_size=None)) if stream else r.content
    return r, raw


def spec_components(*, stream: bool, nonce: bool, client_digest: bool) -> list[str]:
    """spec/signing.md §2.2, for an unauthenticated request."""
    covered = ['"@status"', '"content-type"', '"x-request-id"', '"appliance-stream"' if stream else '"content-digest"']
    if not client_digest:
        covered.append('"appliance-request-digest"')
    covered += ['"@method";req', '"@path";req', '"@query";req']
    if client_digest:
        covered.append('"content-digest";req')
    if nonce:
        covered.append('"appliance-nonce";req')
    return covered + ['"@signature-params"']


def check_body_binding(result, response: requests.Response, sent_body: bytes, *, client_digest: str | None,
                       bound_body: bytes | None = None) -> None:
    """spec/signing.md §2.3: the request body is bound one way or the other, to the bytes sent."""
    covered = result.covered_components
    bound_body = sent_body if bound_body is None else bound_body
    if client_digest is not None:
        assert covered['"content-digest";req'] == client_digest  # resolved from the request as sent
        assert "Appliance-Request-Digest" not in response.headers
        ContentDigest.verify(client_digest, sent_body)
    else:
        value = covered['"appliance-request-digest"']
        assert value == response.headers["Appliance-Request-Digest"] == sha256_field(bound_body)
        ContentDigest.verify(value, bound_body)  # RFC 9530 syntax, the digest of the bytes sent


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digest", sorted(DIGESTS))
@pytest.mark.parametrize("nonce", [None, "interop-nonce-1"])
def test_json_response_verifies_with_the_library(server, keys, digest, nonce):
    r, raw = send(server, "POST", "/v1/completions", COMPLETION, digest=DIGESTS[digest], nonce=nonce)
    assert r.status_code == 200, r.text
    result = rfc9421_verify(keys, r, body=raw)
    client_digest = r.request.headers.get("Content-Digest")
    assert list(result.covered_components) == spec_components(stream=False, nonce=nonce is not None,
                                                              client_digest=client_digest is not None)
    assert result.parameters["tag"] == "appliance-v1" and result.label == "appliance"
    check_body_binding(result, r, COMPLETION, client_digest=client_digest)


@pytest.mark.parametrize("digest", sorted(DIGESTS))
@pytest.mark.parametrize("method,target,body,status", [
    ("POST", "/v1/completions", json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    ("POST", "/v1/completions", b'{"model": "m", "prompt": ', 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": "m", "messages": []}).encode(), 400),
    ("GET", "/nowhere?x=1", b"", 404),
])
def test_error_responses_verify_with_the_library(server, keys, digest, method, target, body, status):
    r, raw = send(server, method, target, body, digest=DIGESTS[digest], nonce="interop-nonce-2")
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"}
    result = rfc9421_verify(keys, r, body=raw)
    client_digest = r.request.headers.get("Content-Digest")
    assert list(result.covered_components) == spec_components(stream=False, nonce=True, client_digest=client_digest is not None)
    check_body_binding(result, r, body, client_digest=client_digest)
    if "?" in target:
        assert result.covered_components['"@query";req'] == "?x=1"


def test_content_digest_mismatch_is_a_400_the_library_verifies(server, keys):
    """A Content-Digest that is not the body's: refused (400), bound to the body received instead."""
    r, raw = send(server, "POST", "/v1/completions", COMPLETION, digest=sha256_field(b"another body"), nonce="interop-3")
    assert r.status_code == 400
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert "Content-Digest" in err["message"]
    result = rfc9421_verify(keys, r, body=raw)
    assert list(result.covered_components) == spec_components(stream=False, nonce=True, client_digest=False)
    check_body_binding(result, r, COMPLETION, client_digest=None)


@pytest.mark.parametrize("digest", ["none", "sha-256"])
def test_413_is_bound_to_the_empty_body(server, keys, digest):
    big = json.dumps({"model": "m", "prompt": "x" * (1 << 20)}).encode()
    r, raw = send(server, "POST", "/v1/completions", big, digest=DIGESTS[digest])
    assert r.status_code == 413
    result = rfc9421_verify(keys, r, body=raw)
    assert list(result.covered_components) == spec_components(stream=False, nonce=False, client_digest=False)
    check_body_binding(result, r, big, client_digest=None, bound_body=b"")
    assert r.headers["Appliance-Request-Digest"] == EMPTY_SHA256


def _final_checkpoint_per_spec(pk: Ed25519PublicKey, response: requests.Response, raw: bytes, body: bytes,
                               nonce: str | None) -> dict:
    """spec/signing.md §3: chain every data event, check each checkpoint and the final one."""
    assert raw.endswith(b"\n\n")
    events = [e + b"\n\n" for e in raw[:-2].split(b"\n\n")]
    h = hashlib.sha256(b"appliance-stream-v1\x00" + response.headers["Signature"].encode()).digest()
    n = 0
    final = None
    for i, ev in enumerate(events):
        if ev.startswith(b": appliance-checkpoint "):
            cp = json.loads(ev[len(b": appliance-checkpoint "):])
            assert cp["seq"] == n and cp["chain"] == base64.b64encode(h).decode()
            pk.verify(base64.b64decode(cp["sig"]), b"appliance-checkpoint-v1\x00" + n.to_bytes(8, "big") + h)
        elif ev.startswith(b": appliance-final "):
            final = json.loads(ev[len(b": appliance-final "):])
            assert events[i + 1:] == [b"data: [DONE]\n\n"]
            break
        else:
            assert ev != b"data: [DONE]\n\n"
            h = hashlib.sha256(h + ev).digest()
            n += 1
    assert final is not None
    sig = base64.b64decode(final.pop("sig"))
    target = response.request.path_url
    text = "\n".join([response.request.method, target, sha256_field(body), nonce or ""])
    request = base64.b64encode(hashlib.sha256(b"appliance-request-v1\x00" + text.encode()).digest()).decode()
    assert set(final) == {"v", "seq", "chain", "request", "finish_reason", "usage"}
    assert (final["v"], final["seq"], final["chain"], final["request"]) == (1, n, base64.b64encode(h).decode(), request)
    pk.verify(sig, b"appliance-final-v1\x00" + json.dumps(final, sort_keys=True, separators=(",", ":")).encode())
    return final


@pytest.mark.parametrize("digest", sorted(DIGESTS))
def test_stream_verifies_with_the_library(server, keys, digest):
    """The header signature (what RFC 9421 covers for a stream) by the library; the events by the final
    checkpoint, rebuilt from the spec."""
    r, raw = send(server, "POST", "/v1/chat/completions", CHAT_STREAM, digest=DIGESTS[digest], nonce="interop-4",
                  stream=True)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    result = rfc9421_verify(keys, r, body=None)  # a stream has no Content-Digest: its body is chained in-band
    client_digest = r.request.headers.get("Content-Digest")
    assert list(result.covered_components) == spec_components(stream=True, nonce=True, client_digest=client_digest is not None)
    assert result.covered_components['"appliance-stream"'] == "sha256-chain-v1"
    check_body_binding(result, r, CHAT_STREAM, client_digest=client_digest)
    pk = keys.keys[result.parameters["keyid"]]
    final = _final_checkpoint_per_spec(pk, r, raw, CHAT_STREAM, "interop-4")
    assert final["finish_reason"] in ("stop", "length") and final["usage"]["completion_tokens"] >= 1


def test_the_library_refuses_tampered_and_replayed_responses(server, keys):
    """The same verifier, on a changed response or a response presented with another request."""
    other = COMPLETION.replace(b"France", b"Spain")
    r, raw = send(server, "POST", "/v1/completions", COMPLETION, digest=sha256_field, nonce="interop-5")
    rfc9421_verify(keys, r, body=raw)
    with pytest.raises(HTTPMessageSignaturesException):  # the body changed
        rfc9421_verify(keys, r, body=raw.replace(b'"text"', b'"text" ', 1))
    r.status_code = 201
    with pytest.raises(HTTPMessageSignaturesException):  # the status changed
        rfc9421_verify(keys, r, body=raw)
    r.status_code = 200
    # presented as the answer to another body sent with its own Content-Digest: "content-digest";req differs
    r.request.headers["Content-Digest"] = sha256_field(other)
    with pytest.raises(HTTPMessageSignaturesException):
        rfc9421_verify(keys, r, body=raw)
    # ... or to a request that sent no Content-Digest: the covered field is not there
    del r.request.headers["Content-Digest"]
    with pytest.raises(HTTPMessageSignaturesException):
        rfc9421_verify(keys, r, body=raw)

    # Without a client Content-Digest the signature itself verifies for any body: what binds the body is
    # Appliance-Request-Digest, which must be the digest of the bytes sent (the spec's check, RFC 9530).
    r, raw = send(server, "POST", "/v1/completions", COMPLETION, nonce="interop-6")
    result = rfc9421_verify(keys, r, body=raw)
    with pytest.raises(HTTPMessageSignaturesException):
        ContentDigest.verify(result.covered_components['"appliance-request-digest"'], other)
    r.headers["Appliance-Request-Digest"] = sha256_field(other)  # and it cannot be changed to match
    with pytest.raises(HTTPMessageSignaturesException):
        rfc9421_verify(keys, r, body=raw)
