"""The middlewares, each with one job, in the order the app runs them:

1. `RequestContext`: request id, security headers, metrics and the access log (never bodies);
2. `BodyLimit`: reads the body once, bounded;
3. `ResponseSigning`: checks a request's Content-Digest and nonce, and signs every response (errors
   included) last, after every other change; JSON bodies in the headers, SSE streams hash-chained
   in-band (spec/signing.md). A 413 is bound to an empty body, since none was read. When a request's
   own Content-Digest matched, the signature binds the body through it (`"content-digest";req`),
   otherwise through `Appliance-Request-Digest`, the digest of the body received;
4. (CORS, when configured);
5. `Authentication`: credentials, scopes and rate limits (appliance.trust.auth);
6. `JsonBody`: content type, JSON parsing, nesting depth.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid

import falcon
import gevent
from gunicorn.http.errors import NoMoreData, ParseException

from appliance.metrics import Metrics
from appliance.settings import Settings
from appliance.telemetry import normal_method
from appliance.trust.auth import Auth, AuthError, Credentials
from appliance.trust.identity import Identity
from appliance.web.errors import BadRequest, PayloadTooLarge, RequestTimeout, UnsupportedMediaType, from_trust
from appliance.web.streams import SignedStream, SseBody
from attestation.signing import (
    CLIENT_HEADER,
    NONCE_HEADER,
    STREAM_HEADER,
    STREAM_SCHEME,
    RequestInfo,
    VerificationError,
    check_content_digest,
)

__all__ = ["RequestContext", "BodyLimit", "ResponseSigning", "Authentication", "JsonBody", "request_info"]

access_log = logging.getLogger("appliance.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cache-Control", "no-store"),
)


class RequestContext:
    """Request id, metrics and the access log (method, route, status, time: never bodies)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.t0 = time.perf_counter()
        rid = req.get_header("X-Request-Id")
        req.context.request_id = rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex
        resp.set_header("X-Request-Id", req.context.request_id)
        for k, v in _SECURITY_HEADERS:
            resp.set_header(k, v)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        route = req.uri_template or "unmatched"
        method = normal_method(req.method)
        status = resp.status_code
        elapsed = time.perf_counter() - getattr(req.context, "t0", time.perf_counter())
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        if status >= 400:
            self.metrics.errors.labels(route, str(status)).inc()
        access_log.info(
            "request",
            extra={
                "request_id": req.context.request_id,
                "method": method,
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000, 2),
            },
        )


class _SlowBody(Exception):
    pass


class BodyLimit:
    """Reads each request's body once, bounded in size (413) and in time (408), for everything after
    it: the signature binds the exact bytes received, the JSON parser and auth read the same copy.
    A body that breaks its own framing (a bad chunk, or the client closing before Content-Length
    bytes) is a 400, never a 500."""

    def __init__(self, max_body_bytes: int, timeout: float = 30.0) -> None:
        self.max_body_bytes = max_body_bytes
        self.timeout = timeout

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.raw_body = b""
        length = req.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes")
        if length or req.get_header("Transfer-Encoding"):
            # Without Content-Length (chunked), Falcon's bounded stream reads nothing: read the
            # server's decoded input directly, still bounded.
            stream = req.bounded_stream if length is not None else req.stream
            try:
                with gevent.Timeout(self.timeout, _SlowBody):
                    raw = stream.read(self.max_body_bytes + 1)
            except _SlowBody:
                raise RequestTimeout(f"The request body did not arrive within {self.timeout:g} seconds") from None
            except NoMoreData:
                raise BadRequest("The request body ended before its Content-Length") from None
            except ParseException as e:
                raise BadRequest(f"The request body is malformed ({type(e).__name__})") from None
            if length is not None and len(raw) < length:
                raise BadRequest("The request body ended before its Content-Length")
            if len(raw) > self.max_body_bytes:
                raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes")
            req.context.raw_body = raw


_NONCE_MAX = 256


def _valid_nonce(nonce: str | None) -> bool:
    return nonce is not None and 0 < len(nonce) <= _NONCE_MAX and nonce.isascii() and nonce.isprintable()


def request_info(req: falcon.Request) -> RequestInfo:
    """The request as the client sent it: the raw target (path and query, as received) and body."""
    target = req.env.get("RAW_URI") or req.env.get("PATH_INFO") or "/"
    if "://" in target:  # absolute-form target: keep the path and query only
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    qs = req.env.get("QUERY_STRING")
    if qs and "?" not in target:  # some servers (and Falcon's test client) keep the query apart
        target = f"{target}?{qs}"
    nonce = req.get_header(NONCE_HEADER)
    # An invalid nonce gets a 400, bound as if no nonce had been sent: a non-ASCII one cannot be signed at all.
    # Likewise a Content-Digest that did not match the body: that 400 is bound to the body received.
    return RequestInfo(
        req.method, target, getattr(req.context, "raw_body", b""), nonce if _valid_nonce(nonce) else None,
        getattr(req.context, "content_digest", None),
    )



class ResponseSigning:
    """Every response signed (errors included), bound to the request it answers (module docstring)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Checked after the body is read, so that these 400s are bound to the body as sent, like any other.
        digest = req.get_header("Content-Digest")
        if digest is not None:
            try:
                check_content_digest(digest, req.context.raw_body)
            except VerificationError:
                raise BadRequest(
                    "Content-Digest does not match the request body "
                    "(RFC 9530: sha-256 and/or sha-512 of the exact bytes sent)",
                    code="content_digest_mismatch",
                ) from None
            req.context.content_digest = digest
        nonce = req.get_header(NONCE_HEADER)
        if nonce is not None and not _valid_nonce(nonce):
            raise BadRequest(f"{NONCE_HEADER}: 1 to {_NONCE_MAX} printable ASCII characters")

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        info = request_info(req)
        if resp.status_code == 413:
            info = info.without_body()
        if resp.stream is not None:
            if not isinstance(resp.stream, SseBody):
                raise TypeError("a streamed response must be an SseBody (web/streams.py)")
            resp.set_header(STREAM_HEADER, STREAM_SCHEME)
            headers = {k.lower(): v for k, v in resp.headers.items()}
            signed = self.identity.sign_response(info, resp.status_code, headers, None)
            for k, v in signed.items():
                resp.set_header(k, v)
            resp.stream = SignedStream(resp.stream, self.identity, info, signed["Signature"])
            return
        body = resp.render_body() or b""
        resp.text = None
        resp.data = body
        if resp.content_type is None:
            resp.content_type = falcon.MEDIA_JSON
        headers = {k.lower(): v for k, v in resp.headers.items()}
        for k, v in self.identity.sign_response(info, resp.status_code, headers, body).items():
            resp.set_header(k, v)


class Authentication:
    """Asks the trust layer who is calling (appliance.trust.auth); binds the principal to the response."""

    def __init__(self, auth: Auth) -> None:
        self.auth = auth

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: object) -> None:
        route = req.uri_template
        if resource is None or route is None:
            return
        creds = Credentials(route, req.method, req.remote_addr, req.headers, lambda: request_info(req))
        principal = self.auth.authenticate(creds)
        auth, remote = self.auth, req.remote_addr

        def rate_limit() -> None:  # a long-lived connection's next request (web/websocket.py)
            try:
                auth.limit(principal, remote)
            except AuthError as e:
                raise from_trust(e) from None

        req.context.rate_limit = rate_limit
        if principal is not None:
            req.context.principal = principal
            resp.set_header(CLIENT_HEADER, principal)  # bound into the response signature


class JsonBody:
    """Enforce the content type, parse JSON once, refuse absurd nesting."""

    def __init__(self, settings: Settings) -> None:
        self.limits = settings.limits
        self._posts: dict[type, bool] = {}  # resource class -> has a POST responder

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource: object, params: object) -> None:
        req.context.json = None
        if req.method != "POST" or resource is None:
            return
        posts = self._posts.get(type(resource))
        if posts is None:
            posts = self._posts[type(resource)] = any(n == "on_post" or n.startswith("on_post_") for n in dir(resource))
        if not posts:
            return  # not a POST route: Falcon answers 405, the body is irrelevant
        ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        raw = req.context.raw_body  # read once, bounded, by the signing middleware
        try:
            body = json.loads(raw, parse_float=_json_number, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise BadRequest("The request body is not valid JSON") from None
        if _depth(body) > self.limits.max_json_depth:
            raise BadRequest(f"The request body nests deeper than {self.limits.max_json_depth} levels")
        req.context.json = body


def _json_number(text: str) -> int | float:
    """A JSON number with a fraction or exponent. JSON Schema (the spec's types) counts one without a
    fractional part as an integer (`2.0`, `1e3`), so it parses as one: an integer field takes it and a
    number field takes either."""
    value = float(text)
    return int(value) if value.is_integer() else value


def _no_constant(name: str) -> float:
    """`NaN` and `Infinity` are not JSON (RFC 8259), though Python's parser takes them by default."""
    raise ValueError(f"{name} is not a JSON value")


def _depth(obj: object) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest
