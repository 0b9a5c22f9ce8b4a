"""Canonical response signing: the one definition shared by the appliance (signer) and clients
(verifier). spec/signing.md describes these bytes; change both together, never one.

JSON responses carry an RFC 9421 signature (Ed25519) over the status, content type, an RFC 9530
`Content-Digest`, the request id, the authenticated client, and the request it answers: method, path,
query and the client's nonce as `;req` components, and the request body's digest either as
`"content-digest";req` (when the request carried a `Content-Digest` that matched its body) or as the
response's own `Appliance-Request-Digest` field. Both are fields a generic RFC 9421 verifier finds in
the messages it holds. Streams cannot carry a body digest in their headers, so their events are
chained with SHA-256 and signed in-band in SSE comment lines, ending with a mandatory final
checkpoint before `data: [DONE]`.

Verification functions raise `VerificationError` naming what failed; they never return False.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

import http_sf
from cryptography.exceptions import InvalidSignature as _CryptoInvalid
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from http_message_signatures import HTTPMessageSigner, HTTPMessageVerifier, algorithms
from http_message_signatures.digests import ContentDigest
from http_message_signatures.exceptions import HTTPMessageSignaturesException
from http_message_signatures.resolvers import HTTPSignatureComponentResolver, HTTPSignatureKeyResolver
from http_message_signatures.structures import VerifyResult
from http_sf.compat import InnerList, Item

__all__ = [
    "VerificationError",
    "LABEL",
    "TAG",
    "NONCE_HEADER",
    "CLIENT_HEADER",
    "CONVERSATION_HEADER",
    "REQUEST_DIGEST_HEADER",
    "STREAM_HEADER",
    "STREAM_SCHEME",
    "CHECKPOINT_PREFIX",
    "FINAL_PREFIX",
    "SSE_DONE",
    "key_id",
    "public_key_from_b64",
    "content_digest",
    "check_content_digest",
    "uri_target",
    "RequestInfo",
    "response_components",
    "sign_response_headers",
    "request_digest",
    "StreamChain",
    "verify_response",
    "verify_stream",
    "VerifiedResponse",
    "VerifiedStream",
    "verify_stream_headers",
    "sign_request",
    "verify_request",
    "VerifiedRequest",
    "conversation_genesis",
    "conversation_turn",
    "conversation_header",
    "parse_conversation_header",
    "ConversationChain",
    "WS_SCHEME",
    "WebSocketChain",
    "WebSocketVerifier",
]

LABEL = "appliance"
TAG = "appliance-v1"
NONCE_HEADER = "appliance-nonce"
CLIENT_HEADER = "appliance-client"
# A response of a conversation (POST /v1/responses): `prev=:<b64>:, head=:<b64>:`, the running hash of the
# conversation before and after this turn (spec/signing.md §6). Covered by the signature when present.
CONVERSATION_HEADER = "appliance-conversation"
REQUEST_ID_HEADER = "x-request-id"
# The digest of the request body received, in a response whose request carried no Content-Digest.
REQUEST_DIGEST_HEADER = "appliance-request-digest"
STREAM_HEADER = "appliance-stream"
STREAM_SCHEME = "sha256-chain-v1"
CHECKPOINT_PREFIX = b": appliance-checkpoint "
FINAL_PREFIX = b": appliance-final "
SSE_DONE = b"data: [DONE]\n\n"
_T = TypeVar("_T")
_SKEW = 60  # seconds of clock skew tolerated for a response's created time
_AUTHORITY = "http://appliance.invalid"  # @authority and @scheme are not covered; a fixed base parses the target
_TARGET_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=:@/?")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
_CHAIN_DOMAIN = b"appliance-stream-v1\x00"
_CHECKPOINT_DOMAIN = b"appliance-checkpoint-v1\x00"
_FINAL_DOMAIN = b"appliance-final-v1\x00"
_REQUEST_DOMAIN = b"appliance-request-v1\x00"
_WS_CLIENT_DOMAIN = b"appliance-ws-client-v1\x00"
_WS_FINAL_DOMAIN = b"appliance-ws-final-v1\x00"
# The `appliance-stream` value of a WebSocket upgrade (spec/signing.md §8).
WS_SCHEME = "sha256-ws-chain-v1"
_GENESIS_DOMAIN = b"appliance-conversation-v1\x00genesis\x00"
_TURN_DOMAIN = b"appliance-conversation-v1\x00turn\x00"


class VerificationError(Exception):
    """A signature, digest or stream check failed; the message says which."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def key_id(public_raw: bytes) -> str:
    """The key id: unpadded base64url of SHA-256 over the raw 32-byte Ed25519 public key."""
    return base64.urlsafe_b64encode(hashlib.sha256(public_raw).digest()).rstrip(b"=").decode()


def public_key_from_b64(text: str) -> Ed25519PublicKey:
    raw = base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_" if ("-" in text or "_" in text) else None)
    if len(raw) != 32:
        raise VerificationError("public key: expected 32 raw Ed25519 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def uri_target(target: str) -> str:
    """The target as @path and @query see it: as sent, except that every character the RFC 3986 path and
    query grammar does not allow (and a `%` that does not start an escape) is percent-encoded, UTF-8,
    upper-case hex. Well-formed targets are unchanged; without this, `?q=a|b` could not be signed at all.
    """
    if all(c in _TARGET_SAFE for c in target) and "%" not in target:
        return target
    out = []
    for i, c in enumerate(target):
        if c in _TARGET_SAFE or (c == "%" and _ESCAPE.match(target, i)):
            out.append(c)
        else:
            out.append("".join(f"%{b:02X}" for b in c.encode()))
    return "".join(out)


def content_digest(body: bytes) -> str:
    """RFC 9530 Content-Digest with sha-256: `sha-256=:<base64>:`."""
    return ContentDigest.create(body)


def check_content_digest(value: str, body: bytes) -> None:
    """A request's RFC 9530 `Content-Digest` against its body: a Structured Field dictionary of
    `sha-256` and/or `sha-512` members (no other algorithm), every one matching. Raises
    VerificationError otherwise."""
    try:
        ContentDigest.verify(value, body)
    except (HTTPMessageSignaturesException, ValueError, TypeError):
        raise VerificationError("content-digest: the request's Content-Digest does not match its body") from None


# ---------------------------------------------------------------------------------------------
# Message adapters for http-message-signatures (duck-typed, requests-style)


class _Headers(dict[str, str]):
    """Lower-cased header names; the library reads items() and writes with []."""

    def __init__(self, items: Iterable[tuple[str, str]] | Mapping[str, str] = ()) -> None:
        super().__init__()
        for k, v in (items.items() if isinstance(items, Mapping) else items):
            self[k] = v

    def __setitem__(self, key: str, value: str) -> None:
        super().__setitem__(key.lower(), value)

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(key.lower())

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and super().__contains__(key.lower())

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key.lower())

    @overload
    def get(self, key: str, default: None = None) -> str | None: ...
    @overload
    def get(self, key: str, default: str) -> str: ...
    @overload
    def get(self, key: str, default: _T) -> str | _T: ...
    def get(self, key: str, default: object = None) -> object:
        return super().get(key.lower(), default)


@dataclass(frozen=True)
class RequestInfo:
    """What a response is bound to: the request as the client sent it and the server received it.

    `content_digest` is the request's `Content-Digest` field value, as sent, or None when it carried
    none. The response then binds the body through it (`"content-digest";req`); without one, through
    `Appliance-Request-Digest`. The server sets it only when it matched the body received.
    """

    method: str
    target: str  # path and query, e.g. "/v1/completions" or "/v1/attestation?nonce=..."
    body: bytes = b""
    nonce: str | None = None
    content_digest: str | None = None

    @functools.cached_property
    def body_digest(self) -> str:
        """`sha-256=:<b64>:` of the body (computed once: the header signature and the stream's final
        checkpoint both use it)."""
        return content_digest(self.body)

    def message(self) -> _Req:
        headers = _Headers()
        if self.content_digest is not None:
            headers["content-digest"] = self.content_digest
        if self.nonce is not None:
            headers[NONCE_HEADER] = self.nonce
        return _Req(self.method.upper(), _AUTHORITY + uri_target(self.target), headers)

    def without_body(self) -> RequestInfo:
        """What a 413 is bound to: the server refused the body unread, so the empty body, and no
        Content-Digest (it could not be checked)."""
        return RequestInfo(self.method, self.target, b"", self.nonce)


@dataclass
class _Req:
    method: str
    url: str
    headers: _Headers


@dataclass
class _Resp:
    status_code: int
    headers: _Headers
    request: _Req


class _Verifier(HTTPMessageVerifier):
    """The library's verifier without its wall-clock check: we check times against an injected clock."""

    def validate_created_and_expires(self, sig_input: object, max_age: object = None) -> None:
        return None


class _Keys(HTTPSignatureKeyResolver):
    def __init__(self, private: Ed25519PrivateKey | None = None, public: Ed25519PublicKey | None = None) -> None:
        self._private = private
        self._public = public

    def resolve_private_key(self, key_id: str) -> Ed25519PrivateKey | None:
        return self._private

    def resolve_public_key(self, key_id: str) -> Ed25519PublicKey | None:
        return self._public


def response_components(
    *, streaming: bool, has_nonce: bool, has_client: bool, request_content_digest: bool = False,
    has_conversation: bool = False,
) -> list[str]:
    """The covered components of spec/signing.md §2.2, in order. `request_content_digest`: the request
    body is bound by the request's own `Content-Digest` (`"content-digest";req`); otherwise by the
    response's `appliance-request-digest`. Exactly one of the two is covered."""
    covered = ["@status", "content-type", REQUEST_ID_HEADER]
    covered.append(STREAM_HEADER if streaming else "content-digest")
    if has_client:
        covered.append(CLIENT_HEADER)
    if has_conversation:
        covered.append(CONVERSATION_HEADER)
    if not request_content_digest:
        covered.append(REQUEST_DIGEST_HEADER)
    covered += ['"@method";req', '"@path";req', '"@query";req']
    if request_content_digest:
        covered.append('"content-digest";req')
    if has_nonce:
        covered.append(f'"{NONCE_HEADER}";req')
    return covered


def sign_response_headers(
    private_key: Ed25519PrivateKey,
    kid: str,
    *,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    body: bytes | None,
    created: datetime.datetime,
    nonce: str,
) -> dict[str, str]:
    """Headers to add to a response: Content-Digest (not for streams), Appliance-Request-Digest (when
    the request carried no Content-Digest), Signature-Input, Signature.

    `body=None` marks a stream: the headers must then carry `appliance-stream: sha256-chain-v1`.
    `request.content_digest` must already have been checked against `request.body`.
    """
    h = _Headers(headers)
    out: dict[str, str] = {}
    if body is not None:
        out["Content-Digest"] = content_digest(body)
        h["content-digest"] = out["Content-Digest"]
    if request.content_digest is None:
        out["Appliance-Request-Digest"] = request.body_digest
        h[REQUEST_DIGEST_HEADER] = request.body_digest
    msg = _Resp(status, h, request.message())
    covered = response_components(
        streaming=body is None, has_nonce=request.nonce is not None, has_client=CLIENT_HEADER in h,
        request_content_digest=request.content_digest is not None, has_conversation=CONVERSATION_HEADER in h,
    )
    prepared = _plain_signature_base(msg, tuple(covered), int(created.timestamp()), kid, nonce)
    if prepared is None:  # something unusual: the library builds it (and raises what it rejects)
        signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(private=private_key))
        p = signer.prepare(
            msg, key_id=kid, created=created, nonce=nonce, label=LABEL, tag=TAG,
            covered_component_ids=covered, use_existing_digest=body is not None,
        )
        prepared = (p.signature_base, p.signature_params)
    base, params = prepared
    # Both fields are single-member Structured Field dictionaries (RFC 8941): label=<the serialised
    # parameters> and label=:<base64>:, byte for byte what the library's sign() writes (tests compare).
    out["Signature-Input"] = f"{LABEL}={params}"
    out["Signature"] = f"{LABEL}=:{b64(private_key.sign(base))}:"
    return out


@functools.lru_cache(maxsize=32)
def _covered(covered: tuple[str, ...]) -> tuple[tuple[Item, ...], tuple[str, ...], str]:
    """A covered-components list parsed and serialised by http_sf, once: (items, each item's
    serialisation, the inner list's serialisation without parameters)."""
    items = []
    for component in covered:  # a bare name, or an already serialised string with parameters
        item = Item()
        item.parse((component if component.startswith('"') else http_sf.ser(component)).encode())
        items.append(item)
    return tuple(items), tuple(str(i) for i in items), str(InnerList(items))


def _plain(text: str) -> bool:
    """Printable ASCII without surrounding spaces: a value the library takes as it is."""
    return text.isascii() and text.isprintable() and text.strip(" ") == text


def _bare(text: str) -> bool:
    """A parameter that serialises as a Structured Field string without escapes: itself, quoted."""
    return _plain(text) and '"' not in text and "\\" not in text


def _plain_signature_base(msg: _Resp, covered: tuple[str, ...], created: int, kid: str, nonce: str) -> tuple[bytes, str] | None:
    """The RFC 9421 signature base and serialised signature parameters of a response, or None when a
    value is unusual (a tab, a control or non-ASCII character, surrounding spaces, an out-of-range time).

    The library's prepare() costs ~0.2 ms a response, mostly re-parsing and re-serialising the same
    component list and parameters as Structured Fields, on the path to every response's first byte.
    Here the component values still come from the library's resolver and the component list from
    http_sf, parsed and serialised once per list; only the lines and the parameters are joined here,
    for values that need no escaping. Anything else goes to prepare(). Tests compare the two.
    """
    if not (_bare(kid) and _bare(nonce) and 0 <= created <= 999_999_999_999_999):
        return None
    items, keys, inner = _covered(covered)
    # http-message-signatures leaves the resolver's __init__ unannotated (a third-party edge).
    resolver = HTTPSignatureComponentResolver(msg)  # type: ignore[no-untyped-call]
    lines = []
    for item, key in zip(items, keys):
        value = resolver.resolve(item)
        if not _plain(value):
            return None
        lines.append(f"{key}: {value}")
    params = f'{inner};created={created};keyid="{kid}";alg="ed25519";nonce="{nonce}";tag="{TAG}"'
    lines.append(f'"@signature-params": {params}')
    return "\n".join(lines).encode(), params


def request_digest(request: RequestInfo) -> str:
    """SHA-256 over the request's method, target, body digest and nonce (the stream's final binding).

    The body digest is always sha-256 of the body, whichever way the header signature binds it."""
    parts = [request.method.upper(), request.target, request.body_digest, request.nonce or ""]
    return b64(hashlib.sha256(_REQUEST_DOMAIN + "\n".join(parts).encode()).digest())


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# ---------------------------------------------------------------------------------------------
# Client request signatures

REQUEST_LABEL = "client"
REQUEST_TAG = "appliance-request-v1"
REQUEST_COMPONENTS = ["@method", "@path", "@query", "content-digest"]


def sign_request(
    private_key: Ed25519PrivateKey,
    keyid: str,
    *,
    method: str,
    target: str,
    body: bytes,
    created: datetime.datetime,
    expires: datetime.datetime,
    nonce: str,
) -> dict[str, str]:
    """Headers a client adds to sign its request: Content-Digest, Signature-Input, Signature."""
    h = _Headers({"content-digest": content_digest(body)})
    msg = _Req(method.upper(), _AUTHORITY + uri_target(target), h)
    signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(private=private_key))
    signer.sign(
        msg, key_id=keyid, created=created, expires=expires, nonce=nonce, label=REQUEST_LABEL, tag=REQUEST_TAG,
        covered_component_ids=REQUEST_COMPONENTS, use_existing_digest=True,
    )
    return {"Content-Digest": h["content-digest"], "Signature-Input": h["signature-input"], "Signature": h["signature"]}


@dataclass(frozen=True)
class VerifiedRequest:
    keyid: str
    nonce: str
    created: int
    expires: int


def verify_request(
    public_keys: Mapping[str, Ed25519PublicKey],
    *,
    method: str,
    target: str,
    headers: Mapping[str, str],
    body: bytes,
    now: float,
    window: int,
) -> VerifiedRequest:
    """Verify a client's request signature: known key, covered components, body digest, time window.

    Replay (the nonce seen before) is the caller's check, with the returned nonce and expiry.
    """
    h = _Headers((k, v) for k, v in headers.items() if k.lower() in ("signature", "signature-input", "content-digest"))
    if "signature" not in h or "signature-input" not in h:
        raise VerificationError("request signature: missing")
    if "content-digest" not in h:
        raise VerificationError("request signature: Content-Digest missing")
    try:
        ContentDigest.verify(h["content-digest"], body)
    except HTTPMessageSignaturesException:
        raise VerificationError("request signature: body does not match Content-Digest") from None

    class _Resolver(HTTPSignatureKeyResolver):
        def resolve_public_key(self, key_id: str) -> Ed25519PublicKey:
            key = public_keys.get(key_id)
            if key is None:
                raise HTTPMessageSignaturesException("unknown key id")
            return key

    msg = _Req(method.upper(), _AUTHORITY + uri_target(target), h)
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=_Resolver())
    try:
        results = verifier.verify(msg, expect_tag=REQUEST_TAG, expect_label=REQUEST_LABEL, require_components=REQUEST_COMPONENTS, max_age=None)
    except HTTPMessageSignaturesException as e:
        raise VerificationError(f"request signature: {str(e) or 'does not verify'}") from None
    p = results[0].parameters
    created, expires, nonce = p.get("created"), p.get("expires"), p.get("nonce")
    if not isinstance(created, int) or not isinstance(expires, int) or not isinstance(nonce, str) or not nonce:
        raise VerificationError("request signature: created, expires and nonce are required")
    if expires <= created or expires - created > window:
        raise VerificationError("request signature: validity longer than the allowed window")
    if created > now + window or expires <= now:
        raise VerificationError("request signature: expired or not yet valid")
    return VerifiedRequest(str(p["keyid"]), nonce, created, expires)


# ---------------------------------------------------------------------------------------------
# Streams


class StreamChain:
    """h0 = SHA-256(domain || Signature header value); h_i = SHA-256(h_{i-1} || event_i bytes)."""

    def __init__(self, signature_header: str) -> None:
        self.head = hashlib.sha256(_CHAIN_DOMAIN + signature_header.encode()).digest()
        self.seq = 0

    def add(self, event: bytes) -> None:
        self.head = hashlib.sha256(self.head + event).digest()
        self.seq += 1

    def checkpoint_payload(self) -> bytes:
        return _CHECKPOINT_DOMAIN + self.seq.to_bytes(8, "big") + self.head

    def checkpoint_line(self, private_key: Ed25519PrivateKey) -> bytes:
        sig = private_key.sign(self.checkpoint_payload())
        body = {"v": 1, "seq": self.seq, "chain": b64(self.head), "sig": b64(sig)}
        return CHECKPOINT_PREFIX + _canonical(body) + b"\n\n"

    def final_fields(
        self, request: RequestInfo, finish_reason: str | None, usage: dict[str, Any] | None,
        conversation: tuple[bytes, bytes] | None = None,
    ) -> dict[str, Any]:
        fields = {
            "v": 1,
            "seq": self.seq,
            "chain": b64(self.head),
            "request": request_digest(request),
            "finish_reason": finish_reason,
            "usage": usage,
        }
        if conversation is not None:  # (prev, head): spec/signing.md §6
            fields["conversation"] = {"prev": b64(conversation[0]), "head": b64(conversation[1])}
        return fields

    def final_line(
        self, private_key: Ed25519PrivateKey, request: RequestInfo, finish_reason: str | None, usage: dict[str, Any] | None,
        conversation: tuple[bytes, bytes] | None = None,
    ) -> bytes:
        fields = self.final_fields(request, finish_reason, usage, conversation)
        fields["sig"] = b64(private_key.sign(_FINAL_DOMAIN + _canonical(fields)))
        return FINAL_PREFIX + _canonical(fields) + b"\n\n"


# ---------------------------------------------------------------------------------------------
# Conversations (spec/signing.md §6)


def conversation_genesis(chain_id: str) -> bytes:
    """head_0 of a chain: SHA-256(domain || the conversation's id, or the first response's id)."""
    return hashlib.sha256(_GENESIS_DOMAIN + chain_id.encode()).digest()


def conversation_turn(prev: bytes, request_body: bytes, response: bytes) -> bytes:
    """head_n = SHA-256(domain || head_{n-1} || SHA-256(request body) || SHA-256(response bytes)).

    The response bytes are the HTTP body of a JSON response, or, in a stream, the JSON data of its
    `response.completed` (or `.incomplete`) event exactly as sent (between `data: ` and the blank line)."""
    if len(prev) != 32:
        raise VerificationError("conversation: a head is 32 bytes")
    return hashlib.sha256(
        _TURN_DOMAIN + prev + hashlib.sha256(request_body).digest() + hashlib.sha256(response).digest()
    ).digest()


def conversation_header(prev: bytes, head: bytes) -> str:
    """The `appliance-conversation` field: an RFC 8941 dictionary of two byte sequences."""
    return f"prev=:{b64(prev)}:, head=:{b64(head)}:"


def parse_conversation_header(value: str) -> tuple[bytes, bytes]:
    try:
        parsed: Any = http_sf.parse(value.encode(), tltype="dictionary")
        prev, head = parsed["prev"][0], parsed["head"][0]
    except Exception:
        raise VerificationError(f"{CONVERSATION_HEADER}: not a dictionary with prev and head byte sequences") from None
    if not (isinstance(prev, bytes) and isinstance(head, bytes) and len(prev) == len(head) == 32):
        raise VerificationError(f"{CONVERSATION_HEADER}: prev and head must be 32-byte sequences")
    return prev, head


class ConversationChain:
    """A client's record of one conversation: each turn's (prev, head), as signed by the appliance, must
    continue the last head it holds and recompute from the bytes it sent and received. A dropped,
    altered, replayed or reordered turn breaks the chain and raises VerificationError."""

    def __init__(self, chain_id: str | None = None, head: bytes | None = None) -> None:
        self.head: bytes | None = head if head is not None else (conversation_genesis(chain_id) if chain_id else None)
        self.turns = 0

    def add(self, prev: bytes, head: bytes, request_body: bytes, response: bytes) -> bytes:
        if self.head is not None and prev != self.head:
            raise VerificationError(
                f"conversation: turn {self.turns + 1} does not continue turn {self.turns} (a turn was dropped, "
                "replayed or reordered, or another conversation's answer came back)"
            )
        if conversation_turn(prev, request_body, response) != head:
            raise VerificationError(f"conversation: turn {self.turns + 1}'s head does not match what was sent and received")
        self.head = head
        self.turns += 1
        return head


# ---------------------------------------------------------------------------------------------
# WebSocket mode (spec/signing.md §8)


class WebSocketChain:
    """Both directions of one WebSocket connection, chained from the signed 101 response.

    Server frames (every text frame but checkpoints and finals) chain as a stream's events do (§3.2);
    the client's text frames that the server took chain separately, from
    SHA-256("appliance-ws-client-v1\\0" || Signature). Checkpoints sign the server chain as in §3.3;
    after each response a final frame signs both heads, the upgrade request's digest, and the
    response's finish reason, usage and conversation turn."""

    def __init__(self, signature_header: str) -> None:
        self.server = StreamChain(signature_header)
        self.client_head = hashlib.sha256(_WS_CLIENT_DOMAIN + signature_header.encode()).digest()
        self.client_seq = 0

    def took(self, frame: bytes) -> None:
        self.client_head = hashlib.sha256(self.client_head + frame).digest()
        self.client_seq += 1

    def sent(self, frame: bytes) -> None:
        self.server.add(frame)

    def checkpoint_fields(self, private_key: Ed25519PrivateKey) -> dict[str, Any]:
        sig = private_key.sign(self.server.checkpoint_payload())
        return {"v": 1, "seq": self.server.seq, "chain": b64(self.server.head), "sig": b64(sig)}

    def final_fields(
        self, request: RequestInfo, finish_reason: str | None, usage: dict[str, Any] | None,
        conversation: tuple[bytes, bytes] | None,
    ) -> dict[str, Any]:
        fields = {
            "v": 1, "seq": self.server.seq, "chain": b64(self.server.head),
            "client_seq": self.client_seq, "client_chain": b64(self.client_head),
            "request": request_digest(request), "finish_reason": finish_reason, "usage": usage,
        }
        if conversation is not None:
            fields["conversation"] = {"prev": b64(conversation[0]), "head": b64(conversation[1])}
        return fields

    def signed_final(
        self, private_key: Ed25519PrivateKey, request: RequestInfo, finish_reason: str | None,
        usage: dict[str, Any] | None, conversation: tuple[bytes, bytes] | None = None,
    ) -> dict[str, Any]:
        fields = self.final_fields(request, finish_reason, usage, conversation)
        fields["sig"] = b64(private_key.sign(_WS_FINAL_DOMAIN + _canonical(fields)))
        return fields


class WebSocketVerifier:
    """A client's check of one WebSocket connection (spec/signing.md §8): the 101's signature first,
    then every frame in order. `sent(frame)` for each text frame the client sends, `received(frame)`
    for each text frame it gets; raises VerificationError at the first frame that breaks the chain,
    a checkpoint or a final that does not verify. `finals` holds each response's verified final."""

    def __init__(self, public_key: Ed25519PublicKey, request: RequestInfo, headers: Mapping[str, str]) -> None:
        result, h = verify_stream_headers(public_key, request, 101, headers)
        if h.get(STREAM_HEADER) != WS_SCHEME:
            raise VerificationError(f"websocket: the 101 response must carry {STREAM_HEADER}: {WS_SCHEME}")
        self._key = public_key
        self._request = request
        self._chain = WebSocketChain(h["signature"])
        self._sent: list[bytes] = []
        self.key_id = str(result.parameters["keyid"])
        self.finals: list[dict[str, Any]] = []
        self.events = 0

    def sent(self, frame: bytes) -> None:
        self._sent.append(frame)

    def received(self, frame: bytes) -> dict[str, Any] | None:
        """The frame's JSON when it is a verified checkpoint or final, else None (a chained event)."""
        try:
            obj = json.loads(frame)
        except ValueError:
            obj = None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind == "appliance.checkpoint":
            cp = obj.get("checkpoint") if isinstance(obj, dict) else None
            if not isinstance(cp, dict) or cp.get("v") != 1:
                raise VerificationError("websocket: malformed checkpoint")
            server = self._chain.server
            if cp.get("seq") != server.seq or cp.get("chain") != b64(server.head):
                raise VerificationError(f"websocket: checkpoint after frame {server.seq} does not match the frames before it")
            _check_sig(self._key, server.checkpoint_payload(), cp.get("sig"), "websocket checkpoint")
            return dict(obj)
        if kind == "appliance.final":
            fin = obj.get("final") if isinstance(obj, dict) else None
            if not isinstance(fin, dict):
                raise VerificationError("websocket: malformed final")
            fin = dict(fin)
            sig = fin.pop("sig", None)
            k = fin.get("client_seq")
            if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= len(self._sent):
                raise VerificationError("websocket: the final counts frames this client never sent")
            while self._chain.client_seq < k:
                self._chain.took(self._sent[self._chain.client_seq])
            conversation = _final_conversation(fin.get("conversation"))
            expected = self._chain.final_fields(self._request, fin.get("finish_reason"), fin.get("usage"), conversation)
            if fin != expected:
                raise VerificationError("websocket: final does not match the frames sent and received")
            _check_sig(self._key, _WS_FINAL_DOMAIN + _canonical(fin), sig, "websocket final")
            self.finals.append(fin)
            return dict(obj)
        self._chain.sent(frame)
        self.events += 1
        return None


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class VerifiedResponse:
    key_id: str
    created: int
    covered: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class VerifiedStream:
    key_id: str
    created: int
    events: list[bytes] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    conversation: tuple[bytes, bytes] | None = None
    """(prev, head) of a conversation's turn, from the signed final line (spec/signing.md §6)."""


def _final_conversation(value: object) -> tuple[bytes, bytes] | None:
    if value is None:
        return None
    try:
        if not isinstance(value, dict) or set(value) != {"prev", "head"}:
            raise ValueError
        prev, head = (base64.b64decode(value[k], validate=True) for k in ("prev", "head"))
    except (ValueError, TypeError):
        raise VerificationError("stream: the final checkpoint's conversation is malformed") from None
    if len(prev) != 32 or len(head) != 32:
        raise VerificationError("stream: the final checkpoint's conversation heads must be 32 bytes")
    return prev, head


def _verify_headers(
    public_key: Ed25519PublicKey,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    *,
    streaming: bool,
    max_age: datetime.timedelta | None,
    now: float | None = None,
) -> tuple[VerifyResult, _Headers]:
    h = _Headers(headers)
    if "signature" not in h or "signature-input" not in h:
        raise VerificationError("signature: the response carries no Signature/Signature-Input")
    msg = _Resp(status, h, request.message())
    # The body travels one of two ways (spec/signing.md §2.3): the request's own Content-Digest, or,
    # when the client sent none (or the server found it did not match), Appliance-Request-Digest.
    by_field = request.content_digest is not None and REQUEST_DIGEST_HEADER not in h
    required = response_components(
        streaming=streaming, has_nonce=request.nonce is not None, has_client=CLIENT_HEADER in h,
        request_content_digest=by_field, has_conversation=CONVERSATION_HEADER in h,
    )
    verifier = _Verifier(signature_algorithm=algorithms.ED25519, key_resolver=_Keys(public=public_key))
    try:
        results = verifier.verify(msg, expect_tag=TAG, expect_label=LABEL, require_components=required, max_age=None)
    except HTTPMessageSignaturesException as e:  # InvalidSignature is a subclass
        raise VerificationError(f"signature: {str(e) or 'does not verify for this request and response'}") from None
    if len(results) != 1:
        raise VerificationError("signature: expected exactly one appliance signature")
    result = results[0]
    expected_kid = key_id(public_key.public_bytes_raw())
    if result.parameters.get("keyid") != expected_kid:
        raise VerificationError("signature: keyid does not match the public key")
    if result.parameters.get("alg") != "ed25519":
        raise VerificationError("signature: alg must be ed25519")
    created = result.parameters.get("created")
    if not isinstance(created, int):
        raise VerificationError("signature: created is required")
    # The signed body binding must be the digest of the body this client sent.
    if by_field and request.content_digest is not None:  # by_field: it is not None
        check_content_digest(request.content_digest, request.body)
    elif h.get(REQUEST_DIGEST_HEADER) != request.body_digest:
        raise VerificationError(
            f"{REQUEST_DIGEST_HEADER}: not the digest of the body sent (the response answers another request)"
        )
    if max_age is not None:
        t = now if now is not None else datetime.datetime.now(datetime.UTC).timestamp()
        if created > t + _SKEW or t - created > max_age.total_seconds():
            raise VerificationError("signature: created is outside the allowed age")
    return result, h


def verify_stream_headers(
    public_key: Ed25519PublicKey,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    *,
    max_age: datetime.timedelta | None = None,
    now: float | None = None,
) -> tuple[VerifyResult, _Headers]:
    """Check a stream's header signature before any event arrives (incremental verifiers)."""
    return _verify_headers(public_key, request, status, headers, streaming=True, max_age=max_age, now=now)


def verify_response(
    public_key: Ed25519PublicKey,
    *,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    max_age: datetime.timedelta | None = None,
    now: float | None = None,
) -> VerifiedResponse:
    """Verify a complete (non-stream) response against the request the client sent.

    A 413 is bound to the empty body: the server refused the body without reading it.
    """
    if status == 413 and (request.body or request.content_digest is not None):
        request = request.without_body()
    result, h = _verify_headers(public_key, request, status, headers, streaming=False, max_age=max_age, now=now)
    try:
        ContentDigest.verify(h["content-digest"], body)
    except HTTPMessageSignaturesException:
        raise VerificationError("content-digest: the body does not match the signed digest") from None
    return VerifiedResponse(str(result.parameters["keyid"]), int(result.parameters["created"]), result.covered_components, body)


def _events(transcript: bytes) -> list[bytes]:
    if not transcript.endswith(b"\n\n"):
        raise VerificationError("stream: truncated (does not end with a complete event)")
    parts = transcript[:-2].split(b"\n\n")
    return [p + b"\n\n" for p in parts]


def verify_stream(
    public_key: Ed25519PublicKey,
    *,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    transcript: bytes,
    max_age: datetime.timedelta | None = None,
    now: float | None = None,
) -> VerifiedStream:
    """Verify a saved SSE transcript: header signature, every checkpoint, the final one, nothing after."""
    result, h = _verify_headers(public_key, request, status, headers, streaming=True, max_age=max_age, now=now)
    if h.get(STREAM_HEADER) != STREAM_SCHEME:
        raise VerificationError(f"stream: {STREAM_HEADER} must be {STREAM_SCHEME}")
    chain = StreamChain(h["signature"])
    data: list[bytes] = []
    events = _events(transcript)
    for i, ev in enumerate(events):
        if ev.startswith(CHECKPOINT_PREFIX):
            cp = _json_line(ev, CHECKPOINT_PREFIX, "checkpoint")
            if cp.get("seq") != chain.seq or cp.get("chain") != b64(chain.head):
                raise VerificationError(f"stream: checkpoint at event {i} does not match the events before it")
            _check_sig(public_key, chain.checkpoint_payload(), cp.get("sig"), f"checkpoint at event {i}")
        elif ev.startswith(FINAL_PREFIX):
            fin = _json_line(ev, FINAL_PREFIX, "final checkpoint")
            sig = fin.pop("sig", None)
            conversation = _final_conversation(fin.get("conversation"))
            expected = chain.final_fields(request, fin.get("finish_reason"), fin.get("usage"), conversation)
            if fin != expected:
                raise VerificationError("stream: final checkpoint does not match the events or the request")
            _check_sig(public_key, _FINAL_DOMAIN + _canonical(fin), sig, "final checkpoint")
            rest = events[i + 1 :]
            if rest != [SSE_DONE]:
                raise VerificationError("stream: events after the final checkpoint other than data: [DONE]")
            return VerifiedStream(
                str(result.parameters["keyid"]), int(result.parameters["created"]), data, fin.get("finish_reason"),
                fin.get("usage"), conversation,
            )
        elif ev == SSE_DONE:
            raise VerificationError("stream: data: [DONE] before the final checkpoint")
        else:
            chain.add(ev)
            data.append(ev)
    raise VerificationError("stream: truncated (no final checkpoint)")


def _json_line(ev: bytes, prefix: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(ev[len(prefix) :].strip())
    except ValueError:
        raise VerificationError(f"stream: malformed {what}") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise VerificationError(f"stream: unsupported {what} version")
    return obj


def _check_sig(public_key: Ed25519PublicKey, payload: bytes, sig_b64: Any, what: str) -> None:
    try:
        public_key.verify(base64.b64decode(sig_b64 or "", validate=True), payload)
    except (_CryptoInvalid, ValueError, TypeError):
        raise VerificationError(f"stream: bad signature on the {what}") from None
