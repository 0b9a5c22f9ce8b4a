"""Attested, verified access to an appliance: attest once, then verify every response with the attested key.

    from attestation.client import attest, verified_openai_client
    from attestation.policy import load_policy

    client = verified_openai_client("https://appliance:3000", policy=load_policy("policy.toml"))
    client.chat.completions.create(model="m", messages=[...])        # verified, or it raises

The flow (spec/attestation.md, "Client flow"):

1. `attest()` sends `GET /v1/attestation?nonce=<64 hex>` with the same nonce in `appliance-nonce`,
   checks the document with `verify_attestation` (evidence, report data, claims, nonce, policy),
   then verifies that very response's RFC 9421 signature with the signing key the claims name. The
   key is thereby bound to the TEE evidence and the evidence to this request.
2. Every later request gets a fresh `appliance-nonce`; every response is verified against the
   attested key and the exact request (method, raw path and query, body bytes, nonce, and the
   request's `Content-Digest` when the caller sent one) before the caller sees any of it: the
   signed digest of the request body, whichever way it travels (spec/signing.md §2.3), must be that
   of the bytes sent. JSON bodies are verified whole; SSE streams incrementally: events are held
   back until a signed checkpoint covering them has verified, and the end of the stream (the final
   checkpoint, `data: [DONE]`, nothing after) is verified before the last events are released.

Many replicas behind a load balancer (spec/attestation.md §10): each replica has its own key, and
`VerifyingTransport` keeps the replicas it attested by key id. A response signed by a key id it has
not attested is held while that replica is attested in full (fresh nonce, the same policy), reached
through the load balancer with the routing header the response carried (`Appliance-Route`); only an
attested key whose id is the response's verifies it.

Nothing here returns an unverified byte: a failure raises `AttestationFailed` (while attesting) or
`VerificationError` (any later response), including truncation and a stream that ends early.

`VerifyingTransport` is an `httpx2` transport (the HTTP library of openai 3.x); this module stays
importable without httpx2, and `attest()` and `verified_request()` then use the standard library.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.client
import json
import re
import secrets
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import http_sf
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .policy import Policy
from .signing import (
    CHECKPOINT_PREFIX,
    FINAL_PREFIX,
    LABEL,
    NONCE_HEADER,
    SSE_DONE,
    STREAM_HEADER,
    STREAM_SCHEME,
    RequestInfo,
    StreamChain,
    VerificationError,
    VerifiedStream,
    key_id,
    verify_response,
    verify_stream,
    verify_stream_headers,
)
from .verify import AttestationFailed, Factor, VerificationReport, verify_attestation

if TYPE_CHECKING:  # type-checked against httpx2; at run time it may be absent (checked where needed)
    import httpx2 as _httpx2
    import openai
else:
    try:  # optional: only VerifyingTransport (and openai clients) need it
        import httpx2 as _httpx2
    except ImportError:  # pragma: no cover - exercised by a subprocess test
        _httpx2 = None

__all__ = [
    "ATTESTATION_PATH",
    "NONCE_BYTES",
    "ROUTE_HEADER",
    "AttestedAppliance",
    "ReplicaAttestationFailed",
    "StreamVerifier",
    "VerifiedHTTPResponse",
    "VerifyingTransport",
    "attest",
    "new_nonce",
    "response_key_id",
    "response_route",
    "verified_openai_client",
    "verified_request",
    "verify_attestation_response",
    "AttestationFailed",
    "VerificationError",
]

ATTESTATION_PATH = "/v1/attestation"
NONCE_BYTES = 32
MAX_ATTESTATION_BYTES = 1 << 20  # the document is ~100 KiB at most (64 KiB evidence + aux, base64)
MAX_RESPONSE_BYTES = 64 << 20  # a JSON response held for verification
MAX_STREAM_BYTES = 256 << 20  # an SSE transcript held until its final checkpoint
MAX_EVENT_BYTES = 4 << 20  # one SSE event
DEFAULT_TIMEOUT = 120.0
ROUTE_HEADER = "appliance-route"
"""Names the replica behind a load balancer: the balancer sets it on every response (the server that
answered) and sends a request carrying it to that server (spec/attestation.md §10). Not signed: it only
says where to attest; the attested key must then be the one that signed the response."""
MAX_REPLICAS = 256  # key ids one VerifyingTransport attests (each costs an attestation round trip)
_ROUTE_RE = re.compile(r"[A-Za-z0-9._:~+/=@-]{1,128}")

RandomBytes = Callable[[int], bytes]


def new_nonce(random_bytes: RandomBytes = secrets.token_bytes) -> str:
    """A fresh nonce: 32 random bytes as 64 lowercase hex characters."""
    raw = random_bytes(NONCE_BYTES)
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != NONCE_BYTES:
        raise ValueError(f"random_bytes must return {NONCE_BYTES} bytes")
    return bytes(raw).hex()


def normalize_base_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` without a trailing slash (a trailing `/v1` is the API, dropped)."""
    u = urllib.parse.urlsplit(url.strip())
    if u.scheme not in ("http", "https") or not u.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    if u.query or u.fragment:
        raise ValueError(f"the appliance URL takes no query or fragment: {url!r}")
    path = u.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urllib.parse.urlunsplit((u.scheme, u.netloc, path, "", ""))


def _origin(scheme: str, host: str, port: int | None) -> tuple[str, str, int]:
    return scheme.lower(), host.lower().strip("[]"), port or (443 if scheme.lower() == "https" else 80)


def _url_origin(url: str) -> tuple[str, str, int]:
    u = urllib.parse.urlsplit(url)
    return _origin(u.scheme, u.hostname or "", u.port)


def _header_map(items: Iterable[tuple[str | bytes, str | bytes]]) -> dict[str, str]:
    """Header (name, value) pairs as one dict; repeated names joined with ", " (as HTTP combines them)."""
    out: dict[str, str] = {}
    for k, v in items:
        k = k.decode("latin-1") if isinstance(k, bytes) else k
        v = v.decode("latin-1") if isinstance(v, bytes) else v
        key = k.lower()
        out[key] = f"{out[key]}, {v}" if key in out else v
    return out


def _is_stream(headers: Mapping[str, str]) -> bool:
    ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    return ctype.split(";", 1)[0].strip().lower() == "text/event-stream"


def _read_bounded(chunks: Iterable[bytes], limit: int, what: str) -> bytes:
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise VerificationError(f"{what}: larger than {limit} bytes")
    return bytes(buf)


# ---------------------------------------------------------------------------------------------
# The attested appliance


@dataclass(frozen=True)
class AttestedAppliance:
    """What attestation established: whose key signs this appliance's responses, and why to trust it."""

    base_url: str
    signing_key: Ed25519PublicKey
    report: VerificationReport
    nonce: str
    document: dict[str, Any] = field(repr=False)
    route: str | None = None
    """The `Appliance-Route` the attestation response carried: which replica a load balancer says
    answered (unsigned; informational, and what a later attestation of this replica is sent with)."""

    @property
    def claims(self) -> dict[str, Any]:
        return self.report.claims or {}

    @property
    def kid(self) -> str:
        return key_id(self.signing_key.public_bytes_raw())

    @property
    def factors(self) -> list[Factor]:
        return list(self.report.factors)

    @property
    def models(self) -> list[str]:
        return [m["name"] for m in self.claims.get("models", [])]

    def table(self) -> str:
        return self.report.table()


class ReplicaAttestationFailed(AttestationFailed):
    """A replica behind a load balancer failed attestation: named by its routing header value and key id.

    `kid` is the key id of the response that led to attesting it (or, when the first attestation of a
    transport fails, the key id its claims name, if they parse); `route` the `Appliance-Route` value.
    Both come from the network, unverified: they name the replica, they vouch for nothing.
    """

    def __init__(self, report: VerificationReport, *, kid: str | None, route: str | None) -> None:
        super().__init__(report)
        self.kid = kid
        self.route = route
        names = ", ".join(f.name for f in report.failures()) or "no factor passed"
        self.args = (f"replica {route!r} (kid {kid}): attestation failed: {names}",)


def response_route(headers: Mapping[str, str]) -> str | None:
    """The response's `Appliance-Route` value, or None when absent or not a plain token (never sent on)."""
    value = next((v for k, v in headers.items() if k.lower() == ROUTE_HEADER), None)
    if value is None or not _ROUTE_RE.fullmatch(value.strip()):
        return None
    return value.strip()


def response_key_id(headers: Mapping[str, str]) -> str | None:
    """The `keyid` of the appliance's signature (label `appliance`) in Signature-Input, unverified.

    Says only which key to verify the response with; None when there is no such signature (verification
    then fails in the usual way)."""
    h = {k.lower(): v for k, v in headers.items()}
    if "signature" not in h or "signature-input" not in h:
        return None
    try:
        parsed = http_sf.parse(h["signature-input"].encode("latin-1"), tltype="dictionary")
    except (ValueError, UnicodeEncodeError):
        return None
    entry = parsed.get(LABEL) if isinstance(parsed, dict) else None
    if not isinstance(entry, tuple) or len(entry) != 2 or not isinstance(entry[1], dict):
        return None
    kid = entry[1].get("keyid")
    return kid if isinstance(kid, str) and 0 < len(kid) <= 128 else None


def _fail(factor: str, detail: str, report: VerificationReport | None = None) -> AttestationFailed:
    report = report or VerificationReport()
    report.add(factor, "fail", detail)
    return AttestationFailed(report)


def verify_attestation_response(
    *,
    base_url: str,
    request: RequestInfo,
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    policy: Policy,
    now: float | None = None,
    observed_tls_sha256: str | None = None,
) -> AttestedAppliance:
    """Check a fetched attestation response: the document, then its signature by the attested key.

    `request` is the attestation request as sent (its nonce both in the query and the header).
    Raises `AttestationFailed`, whose report names every factor, on any failure.
    """
    if request.nonce is None:
        raise ValueError("the attestation request must carry its nonce")
    if status != 200:
        detail = f"HTTP {status}"
        try:
            msg = json.loads(body)["error"]["message"]
            detail += f": {str(msg)[:200]}"
        except (ValueError, KeyError, TypeError):
            pass
        raise _fail("fetch", f"{ATTESTATION_PATH} answered {detail}")
    if len(body) > MAX_ATTESTATION_BYTES:
        raise _fail("document", f"larger than {MAX_ATTESTATION_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise _fail("document", "the attestation response is not JSON") from None
    report = verify_attestation(doc, nonce=request.nonce, policy=policy, now=now, observed_tls_sha256=observed_tls_sha256)
    key = report.signing_key
    if key is None:  # never: verify_attestation fails the signing-key factor without one
        raise _fail("signing-key", "the attestation names no signing key")
    try:
        verify_response(key, request=request, status=status, headers=headers, body=body)
    except VerificationError as e:
        report.add("response-signature", "fail", f"not signed by the attested key for this request ({e})")
        raise AttestationFailed(report) from e
    report.add("response-signature", "pass", "the document arrived signed by the attested key, bound to this request")
    return AttestedAppliance(normalize_base_url(base_url), key, report, request.nonce, doc)


# ---------------------------------------------------------------------------------------------
# HTTP: a minimal standard-library client, and adapters for httpx2 clients and transports


@dataclass
class _Raw:
    """An HTTP response as it came off the wire: body bytes still to be read, never decoded."""

    status: int
    headers: dict[str, str]
    target: str  # the request target as sent (raw path and query)
    chunks: Iterator[bytes]
    close: Callable[[], None]
    tls_spki_sha256: str | None = None


def _spki_sha256(der_cert: bytes | None) -> str | None:
    if not der_cert:
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    cert = x509.load_der_x509_certificate(der_cert)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


class StdlibHTTP:
    """One request per connection with http.client: no redirects, no decompression, no proxies."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        attested_tls: bool = False,
    ) -> None:
        """`attested_tls`: the server's certificate is self-signed and pinned by the attestation
        (claims `tls_public_key_sha256`), not checked against CAs. Until a pin is set (after
        attestation) only the attestation document is fetched; once set, every connection's key is
        compared with it before any request byte is sent."""
        self.timeout = timeout
        self.attested_tls = attested_tls
        self.pin_spki_sha256: str | None = None
        if ssl_context is None:
            ssl_context = ssl.create_default_context()
            if attested_tls:
                ssl_context.check_hostname = False
                ssl_context.verify_mode = ssl.CERT_NONE
        self.ssl_context = ssl_context

    def open(self, method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> _Raw:
        u = urllib.parse.urlsplit(url)
        if u.scheme == "https" and u.hostname:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                u.hostname, u.port, timeout=self.timeout, context=self.ssl_context
            )
        elif u.scheme == "http" and u.hostname:
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=self.timeout)
        else:
            raise ValueError(f"not an http(s) URL: {url!r}")
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        tls = None
        try:
            if u.scheme == "https":
                # The peer's key, read right after the handshake (http.client drops the socket once a
                # `Connection: close` response arrives) and, with attested TLS, checked before any
                # request byte leaves.
                conn.connect()
                tls = _spki_sha256(cast(ssl.SSLSocket, conn.sock).getpeercert(binary_form=True))
                if self.attested_tls:
                    if self.pin_spki_sha256 is not None and tls != self.pin_spki_sha256:
                        raise VerificationError("tls: the server's TLS key is not the attested one")
                    if self.pin_spki_sha256 is None and not target.startswith(ATTESTATION_PATH):
                        raise VerificationError("tls: attested TLS is not pinned yet: attest first")
            conn.putrequest(method, target, skip_accept_encoding=True)
            conn.putheader("Accept-Encoding", "identity")
            conn.putheader("Connection", "close")
            for k, v in headers.items():
                conn.putheader(k, v)
            if body or method.upper() in ("POST", "PUT", "PATCH"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            resp = conn.getresponse()
        except BaseException:
            conn.close()
            raise

        def chunks() -> Iterator[bytes]:
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    return
                yield chunk

        def close() -> None:
            resp.close()
            conn.close()

        return _Raw(resp.status, _header_map(resp.getheaders()), target, chunks(), close, tls)


class _HttpxClientHTTP:
    """An httpx2.Client (its transport, event hooks and timeouts); raw bytes, never decoded."""

    def __init__(self, client: _httpx2.Client) -> None:
        self.client = client

    def open(self, method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> _Raw:
        req = self.client.build_request(method, url, headers=dict(headers), content=body or None)
        resp = self.client.send(req, stream=True)
        return _Raw(
            resp.status_code, _header_map(resp.headers.raw), req.url.raw_path.decode("ascii"),
            resp.iter_raw(), resp.close, _httpx_tls(resp),
        )


class _HttpxTransportHTTP:
    """A bare httpx2 transport (what VerifyingTransport wraps); `timeout` as the Client would set it."""

    def __init__(self, transport: _httpx2.BaseTransport, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.transport = transport
        self.timeout = timeout

    def open(self, method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> _Raw:
        req = _httpx2.Request(
            method, url, headers=dict(headers), content=body or None,
            extensions={"timeout": _httpx2.Timeout(self.timeout).as_dict()},
        )
        resp = self.transport.handle_request(req)
        stream = cast(_httpx2.SyncByteStream, resp.stream)  # a sync transport answers with a sync stream
        return _Raw(
            resp.status_code, _header_map(resp.headers.raw), req.url.raw_path.decode("ascii"),
            iter(stream), stream.close, _httpx_tls(resp),
        )


def _httpx_tls(resp: _httpx2.Response) -> str | None:
    try:
        stream = resp.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        return _spki_sha256(ssl_object.getpeercert(binary_form=True)) if ssl_object is not None else None
    except Exception:  # no TLS, or a transport without a network stream
        return None


class _HTTP(Protocol):
    """What attest() and verified_request() send requests with: StdlibHTTP, or an adapter of an
    httpx2 client or transport (or a test's fake)."""

    def open(self, method: str, url: str, headers: Mapping[str, str], body: bytes = b"") -> _Raw: ...


def _as_http(http: object) -> _HTTP:
    """`http` as given (anything with `open`), an httpx2.Client or transport adapted, or StdlibHTTP for None."""
    if http is None:
        return StdlibHTTP()
    if hasattr(http, "open"):
        return cast(_HTTP, http)
    if hasattr(http, "build_request") and hasattr(http, "send"):
        return _HttpxClientHTTP(cast(_httpx2.Client, http))
    if hasattr(http, "handle_request"):
        return _HttpxTransportHTTP(cast(_httpx2.BaseTransport, http))
    raise TypeError("http: an httpx2.Client, an httpx2 transport, or None (the standard library)")


# ---------------------------------------------------------------------------------------------
# Attestation


def attest(
    base_url: str,
    *,
    policy: Policy,
    http: object = None,
    now: float | None = None,
    random_bytes: RandomBytes = secrets.token_bytes,
    observed_tls_sha256: str | None = None,
    route: str | None = None,
) -> AttestedAppliance:
    """Attest the appliance at `base_url` with a fresh nonce; raise `AttestationFailed` unless it all holds.

    `http` is an httpx2.Client, an httpx2 transport, or None (a standard-library client). For an
    https URL the TLS key is taken from the connection when `observed_tls_sha256` is not given.
    `route`: send `Appliance-Route: <route>` so that a load balancer honouring it attests that replica.
    When the response names a route, a failure is a `ReplicaAttestationFailed` naming it.
    """
    base = normalize_base_url(base_url)
    nonce = new_nonce(random_bytes)
    client = _as_http(http)
    headers = {NONCE_HEADER: nonce, "Accept": "application/json"}
    if route is not None:
        if not _ROUTE_RE.fullmatch(route):
            raise ValueError(f"route: not a plain token: {route!r}")
        headers[ROUTE_HEADER] = route
    raw = client.open("GET", f"{base}{ATTESTATION_PATH}?nonce={nonce}", headers)
    served = response_route(raw.headers)
    try:
        try:
            body = _read_bounded(raw.chunks, MAX_ATTESTATION_BYTES, "attestation response")
        except VerificationError as e:
            raise _fail("document", str(e)) from None
        finally:
            raw.close()
        request = RequestInfo("GET", raw.target, b"", nonce)
        appliance = verify_attestation_response(
            base_url=base, request=request, status=raw.status, headers=raw.headers, body=body, policy=policy, now=now,
            observed_tls_sha256=observed_tls_sha256 if observed_tls_sha256 is not None else raw.tls_spki_sha256,
        )
    except AttestationFailed as e:
        if served is None or isinstance(e, ReplicaAttestationFailed):
            raise
        claimed = (e.report.claims or {}).get("signing_key")
        kid = claimed.get("kid") if isinstance(claimed, dict) and isinstance(claimed.get("kid"), str) else None
        raise ReplicaAttestationFailed(e.report, kid=kid, route=served) from None
    return dataclasses.replace(appliance, route=served)


# ---------------------------------------------------------------------------------------------
# Streams, verified as they arrive


class StreamVerifier:
    """Verifies an SSE response incrementally; releases only what a verified signature covers.

    The header signature (bound to the request and its nonce) is checked at construction. `feed()`
    takes bytes as they arrive and returns the complete events now covered by a verified checkpoint
    (data events are held until then). `finish()` is called at the end of the body: it checks the
    final checkpoint, `data: [DONE]` and that nothing follows, by running `verify_stream` over the
    whole transcript (the reference verifier), and returns the remaining events. Any failure raises
    `VerificationError`; after one, nothing more is released.
    """

    def __init__(
        self,
        public_key: Ed25519PublicKey,
        *,
        request: RequestInfo,
        status: int,
        headers: Mapping[str, str],
        max_bytes: int = MAX_STREAM_BYTES,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._key = public_key
        self._request = request
        self._status = status
        self._headers = dict(headers)
        self._max_bytes = max_bytes
        self._max_event = max_event_bytes
        verify_stream_headers(public_key, request, status, headers)
        h = {k.lower(): v for k, v in headers.items()}
        if h.get(STREAM_HEADER) != STREAM_SCHEME:
            raise VerificationError(f"stream: {STREAM_HEADER} must be {STREAM_SCHEME}")
        self._chain = StreamChain(h["signature"])
        self._buf = b""
        self._transcript = bytearray()
        self._pending: list[bytes] = []
        self._index = 0
        self._state = "data"  # data -> final -> done
        self._failed = False
        self.result: VerifiedStream | None = None
        self.checkpoints = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        self._check_usable()
        try:
            self._buf += chunk
            if len(self._transcript) + len(self._buf) > self._max_bytes:
                raise VerificationError(f"stream: larger than {self._max_bytes} bytes")
            released: list[bytes] = []
            while True:
                cut = self._buf.find(b"\n\n")
                if cut < 0:
                    break
                event, self._buf = self._buf[: cut + 2], self._buf[cut + 2 :]
                released += self._event(event)
            if len(self._buf) > self._max_event:
                raise VerificationError(f"stream: an event larger than {self._max_event} bytes")
            return released
        except VerificationError:
            self._failed = True
            raise

    def finish(self) -> list[bytes]:
        self._check_usable()
        try:
            if self._buf:
                raise VerificationError("stream: truncated (does not end with a complete event)")
            # The reference verifier over everything received: the header signature again, every
            # checkpoint, the final checkpoint (chain, request digest, signature), [DONE] and nothing after.
            self.result = verify_stream(
                self._key, request=self._request, status=self._status, headers=self._headers,
                transcript=bytes(self._transcript),
            )
            if self._state != "done":  # cannot happen when verify_stream passed; never release on doubt
                raise VerificationError("stream: truncated (no final checkpoint)")
        except VerificationError:
            self._failed = True
            raise
        out, self._pending = self._pending, []
        self._state = "verified"
        return out

    def _check_usable(self) -> None:
        if self._failed:
            raise VerificationError("stream: verification already failed")
        if self._state == "verified":
            raise VerificationError("stream: already finished")

    def _event(self, ev: bytes) -> list[bytes]:
        i = self._index
        self._index += 1
        self._transcript += ev
        if self._state == "done":
            raise VerificationError("stream: events after the final checkpoint other than data: [DONE]")
        if self._state == "final":
            if ev != SSE_DONE:
                raise VerificationError("stream: events after the final checkpoint other than data: [DONE]")
            self._state = "done"
            self._pending.append(ev)
            return []
        if ev.startswith(CHECKPOINT_PREFIX):
            self._checkpoint(ev, i)
            self._pending.append(ev)
            out, self._pending = self._pending, []
            self.checkpoints += 1
            return out
        if ev.startswith(FINAL_PREFIX):
            self._state = "final"
            self._pending.append(ev)
            return []
        if ev == SSE_DONE:
            raise VerificationError("stream: data: [DONE] before the final checkpoint")
        self._chain.add(ev)
        self._pending.append(ev)
        return []

    def _checkpoint(self, ev: bytes, i: int) -> None:
        try:
            cp = json.loads(ev[len(CHECKPOINT_PREFIX) :].strip())
        except ValueError:
            raise VerificationError("stream: malformed checkpoint") from None
        if not isinstance(cp, dict) or cp.get("v") != 1:
            raise VerificationError("stream: unsupported checkpoint version")
        if cp.get("seq") != self._chain.seq or cp.get("chain") != base64.b64encode(self._chain.head).decode():
            raise VerificationError(f"stream: checkpoint at event {i} does not match the events before it")
        try:
            sig = base64.b64decode(cp.get("sig") or "", validate=True)
            self._key.verify(sig, self._chain.checkpoint_payload())
        except Exception:
            raise VerificationError(f"stream: bad signature on the checkpoint at event {i}") from None


def _verified_chunks(chunks: Iterable[bytes], verifier: StreamVerifier, close: Callable[[], None]) -> Iterator[bytes]:
    """Raw stream chunks in, verified events out (joined per release); closes the source when done."""
    try:
        for chunk in chunks:
            out = verifier.feed(chunk)
            if out:
                yield b"".join(out)
        out = verifier.finish()
        if out:
            yield b"".join(out)
    finally:
        close()


# ---------------------------------------------------------------------------------------------
# Verified requests without httpx2 (the CLI uses these)


@dataclass
class VerifiedHTTPResponse:
    """A response whose signature verified. For a stream, `events()` yields events as they verify."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    _events: Iterator[bytes] | None = field(default=None, repr=False)
    stream_result: Callable[[], VerifiedStream | None] | None = field(default=None, repr=False)

    @property
    def is_stream(self) -> bool:
        return self._events is not None

    def json(self) -> Any:
        if self.body is None:
            raise ValueError("a stream has no JSON body")
        return json.loads(self.body)

    def events(self) -> Iterator[bytes]:
        """Each verified SSE event (bytes ending in a blank line), checkpoints and [DONE] included."""
        if self._events is None:
            raise ValueError("not a stream")
        for block in self._events:
            for part in block.split(b"\n\n")[:-1]:
                yield part + b"\n\n"


def verified_request(
    appliance: AttestedAppliance,
    method: str,
    path: str,
    *,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    http: object = None,
    random_bytes: RandomBytes = secrets.token_bytes,
) -> VerifiedHTTPResponse:
    """Send one request to the attested appliance with a fresh nonce; verify what comes back."""
    nonce = new_nonce(random_bytes)
    client = _as_http(http)
    hdrs = {k: v for k, v in (headers or {}).items() if k.lower() != NONCE_HEADER}
    hdrs[NONCE_HEADER] = nonce
    raw = client.open(method.upper(), appliance.base_url + path, hdrs, body)
    digest = next((v for k, v in hdrs.items() if k.lower() == "content-digest"), None)
    info = RequestInfo(method.upper(), raw.target, body, nonce, digest)
    try:
        if _is_stream(raw.headers):
            verifier = StreamVerifier(appliance.signing_key, request=info, status=raw.status, headers=raw.headers)
            return VerifiedHTTPResponse(
                raw.status, raw.headers, None, _verified_chunks(raw.chunks, verifier, raw.close), lambda: verifier.result
            )
        data = _read_bounded(raw.chunks, MAX_RESPONSE_BYTES, "response")
        verify_response(appliance.signing_key, request=info, status=raw.status, headers=raw.headers, body=data)
    except BaseException:
        raw.close()
        raise
    raw.close()
    return VerifiedHTTPResponse(raw.status, raw.headers, data)


# ---------------------------------------------------------------------------------------------
# httpx2 transport (openai 3.x)


if TYPE_CHECKING:
    _BaseTransport = _httpx2.BaseTransport
    _SyncByteStream = _httpx2.SyncByteStream
else:
    _BaseTransport = _httpx2.BaseTransport if _httpx2 is not None else object
    _SyncByteStream = _httpx2.SyncByteStream if _httpx2 is not None else object


class _VerifiedByteStream(_SyncByteStream):
    def __init__(self, inner: _httpx2.SyncByteStream, verifier: StreamVerifier) -> None:
        self._inner = inner
        self._verifier = verifier

    def __iter__(self) -> Iterator[bytes]:
        yield from _verified_chunks(self._inner, self._verifier, self.close)

    def close(self) -> None:
        self._inner.close()


class VerifyingTransport(_BaseTransport):
    """An httpx2 transport that only ever returns responses signed by an attested appliance.

        transport = VerifyingTransport("http://127.0.0.1:3000", policy=Policy(...))
        client = openai.OpenAI(base_url="http://127.0.0.1:3000/v1", api_key="...",
                               http_client=httpx2.Client(transport=transport))

    It attests on first use (or takes `appliance=`), refuses requests to any other origin, adds a
    fresh `appliance-nonce` to every request, and verifies every response against the attested key
    and the request as sent: JSON in full before it is returned, SSE streams incrementally (see
    `StreamVerifier`). Failures raise `AttestationFailed` / `VerificationError`, which the openai
    client passes through unchanged (it neither wraps nor retries them).

    Behind a load balancer (spec/attestation.md §10) it keeps every replica it attested, by key id
    (`replicas`). A response signed by another key id is held, before any byte of it is returned,
    while that replica is attested with the `Appliance-Route` value the response carried (a fresh
    nonce, the same policy); the attested key's id must be the response's. Each replica is attested
    once, however many threads meet it at the same time. A replica that fails raises
    `ReplicaAttestationFailed` naming it; a response with an unknown key id and no route, or whose
    route leads to another key, raises `VerificationError`. At most `max_replicas` key ids are kept.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        policy: Policy | None = None,
        appliance: AttestedAppliance | None = None,
        transport: _httpx2.BaseTransport | None = None,
        random_bytes: RandomBytes = secrets.token_bytes,
        now: Callable[[], float] | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        max_replicas: int = MAX_REPLICAS,
    ) -> None:
        if _httpx2 is None:
            raise ImportError("VerifyingTransport needs httpx2 (pip install httpx2, or openai>=3)")
        if appliance is not None:
            url = url if url is not None else appliance.base_url
        elif url is None or policy is None:
            raise ValueError("VerifyingTransport: give url and policy, or an attested appliance")
        self.base_url = normalize_base_url(url)
        self.policy = policy
        self._appliance = appliance
        self._inner = transport if transport is not None else _httpx2.HTTPTransport()
        self._random_bytes = random_bytes
        self._now = now
        self._max_response = max_response_bytes
        self._max_replicas = max_replicas
        self._lock = threading.Lock()  # the first attestation (held while it runs: nothing is sent before it)
        self._state = threading.Lock()  # replicas, gates and counters (never held across I/O)
        self._replicas: dict[str, AttestedAppliance] = {}
        self._gates: dict[str, threading.Lock] = {}  # one per key id being attested: each replica attested once
        self._origin = _url_origin(self.base_url)
        self.verified_responses = 0
        self.verified_streams = 0
        self.attestations = 0
        """Attestation requests this transport made (the first one, and one per further replica tried)."""
        if appliance is not None:
            self._replicas[appliance.kid] = appliance

    @property
    def appliance(self) -> AttestedAppliance:
        """The first attested appliance (replica), attesting now if that has not happened yet."""
        with self._lock:
            if self._appliance is None:
                if self.policy is None:  # __init__ requires a policy when no appliance is given
                    raise ValueError("VerifyingTransport: no policy to attest with")
                appliance = self._attest()
                with self._state:
                    self._replicas.setdefault(appliance.kid, appliance)
                self._appliance = appliance
            return self._appliance

    @property
    def replicas(self) -> dict[str, AttestedAppliance]:
        """Every attested replica by key id (a copy), the first one included."""
        with self._state:
            return dict(self._replicas)

    def _attest(self, route: str | None = None) -> AttestedAppliance:
        if self.policy is None:
            raise ValueError("VerifyingTransport: no policy to attest a replica with")
        with self._state:
            self.attestations += 1
        return attest(
            self.base_url, policy=self.policy, http=_HttpxTransportHTTP(self._inner),
            now=self._now() if self._now else None, random_bytes=self._random_bytes, route=route,
        )

    def _key_for(self, primary: AttestedAppliance, headers: Mapping[str, str]) -> Ed25519PublicKey:
        """The attested key to verify a response with: the one its signature names, attested now if new.

        A response without a parsable appliance signature is checked against the first replica's key,
        which fails it with the precise reason."""
        kid = response_key_id(headers)
        if kid is None or kid == primary.kid:
            return primary.signing_key
        with self._state:
            known = self._replicas.get(kid)
        if known is not None:
            return known.signing_key
        return self._attest_replica(kid, response_route(headers)).signing_key

    def _attest_replica(self, kid: str, route: str | None) -> AttestedAppliance:
        if self.policy is None:
            raise VerificationError(f"signature: signed by key id {kid}, not the given appliance's, and no policy to attest it with")
        if route is None:
            raise VerificationError(
                f"signature: signed by key id {kid}, which is not an attested replica, and the response "
                f"names no {ROUTE_HEADER} to attest it by"
            )
        with self._state:
            known = self._replicas.get(kid)
            if known is not None:
                return known
            if len(self._replicas) >= self._max_replicas:
                raise VerificationError(f"signature: key id {kid}: more than {self._max_replicas} replicas to attest")
            gate = self._gates.setdefault(kid, threading.Lock())
        with gate:
            with self._state:
                known = self._replicas.get(kid)
            if known is not None:  # another thread attested it while this one waited
                return known
            try:
                attested = self._attest(route)
                with self._state:  # attested in full either way; only the response's own key verifies it
                    self._replicas.setdefault(attested.kid, attested)
            except AttestationFailed as e:
                raise ReplicaAttestationFailed(e.report, kid=kid, route=route) from None
            finally:
                with self._state:
                    self._gates.pop(kid, None)
            if attested.kid != kid:
                raise VerificationError(
                    f"signature: the response is signed by key id {kid}, but attesting replica {route!r} gave "
                    f"key id {attested.kid} (route {attested.route!r}): the answer's replica is not attested"
                )
            return attested

    def handle_request(self, request: _httpx2.Request) -> _httpx2.Response:
        url = request.url
        if _origin(url.scheme, url.host, url.port) != self._origin:
            raise VerificationError(
                f"refusing to send a request to {url.scheme}://{url.host}: not the attested appliance {self.base_url}"
            )
        appliance = self.appliance
        body = request.read()
        nonce = new_nonce(self._random_bytes)
        request.headers[NONCE_HEADER] = nonce
        # A Content-Digest the caller added travels with the request; the response is then bound by it.
        info = RequestInfo(request.method, url.raw_path.decode("ascii"), body, nonce, request.headers.get("content-digest"))
        response = self._inner.handle_request(request)
        raw = cast(_httpx2.SyncByteStream, response.stream)  # a sync transport answers with a sync stream
        headers = _header_map(response.headers.raw)
        stream: _httpx2.SyncByteStream
        try:
            # Known from the headers, before any byte of the body is returned (streams included).
            key = self._key_for(appliance, headers)
            if _is_stream(headers):
                verifier = StreamVerifier(key, request=info, status=response.status_code, headers=headers)
                stream = _VerifiedByteStream(raw, verifier)
                with self._state:
                    self.verified_streams += 1
            else:
                data = _read_bounded(raw, self._max_response, "response")
                verify_response(key, request=info, status=response.status_code, headers=headers, body=data)
                stream = _httpx2.ByteStream(data)
                with self._state:
                    self.verified_responses += 1
        except BaseException:
            raw.close()
            raise
        if not isinstance(stream, _VerifiedByteStream):
            raw.close()
        return _httpx2.Response(
            response.status_code, headers=response.headers.raw, stream=stream, extensions=response.extensions
        )

    def close(self) -> None:
        self._inner.close()


def verified_openai_client(
    url: str,
    *,
    policy: Policy,
    api_key: str | None = "none",
    transport: _httpx2.BaseTransport | None = None,
    **kwargs: Any,
) -> openai.OpenAI:
    """An `openai.OpenAI` client for the appliance at `url` whose every response is verified.

    `api_key` None, "" or "none" sends no Authorization header (an appliance without API keys).
    Extra keyword arguments go to `openai.OpenAI` (timeout, max_retries, ...).
    """
    import openai

    vt = VerifyingTransport(url, policy=policy, transport=transport)
    hooks: dict[str, list[Callable[[_httpx2.Request], object]]] = {}
    if not api_key or api_key == "none":
        hooks = {"request": [lambda request: request.headers.pop("authorization", None)]}
    http_client = _httpx2.Client(transport=vt, event_hooks=hooks, timeout=kwargs.pop("timeout", DEFAULT_TIMEOUT))
    return openai.OpenAI(base_url=vt.base_url + "/v1", api_key=api_key or "none", http_client=http_client, **kwargs)
