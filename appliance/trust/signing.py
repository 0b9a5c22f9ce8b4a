"""Every response signed (errors included), bound to the request it answers.

The middleware reads each request's body once (bounded: 413 past the limit) so that the digest it
signs is of the exact bytes received; a 413 is bound to an empty body, since none was read. A
request's own `Content-Digest` is checked against that body (a mismatch is a 400, before anything
else runs); when it matched, the signature binds the body through it (`"content-digest";req`),
otherwise through `Appliance-Request-Digest`, the digest of the body received.
JSON bodies are digested and signed in the headers; SSE streams are hash-chained and signed in-band
(see attestation.signing and spec/signing.md).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import falcon

from appliance.trust.identity import Identity
from appliance.web.errors import BadRequest, PayloadTooLarge
from attestation.signing import (
    NONCE_HEADER,
    SSE_DONE,
    STREAM_HEADER,
    STREAM_SCHEME,
    RequestInfo,
    StreamChain,
    VerificationError,
    check_content_digest,
)

__all__ = ["ResponseSigning", "SignedStream", "request_info"]

log = logging.getLogger("appliance.signing")

CHECKPOINT_EVERY = 16  # data events between signed checkpoints, once the stream is under way
_EARLY_CHECKPOINTS = frozenset({1, 2, 4, 8})  # so a verifying client can release the first tokens at once


def checkpoint_due(seq: int) -> bool:
    return seq in _EARLY_CHECKPOINTS or seq % CHECKPOINT_EVERY == 0
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
    def __init__(self, identity: Identity, max_body_bytes: int) -> None:
        self.identity = identity
        self.max_body_bytes = max_body_bytes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.raw_body = b""
        length = req.content_length
        if length is not None and length > self.max_body_bytes:
            raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes")
        if length or req.get_header("Transfer-Encoding"):
            # Without Content-Length (chunked), Falcon's bounded stream reads nothing: read the
            # server's decoded input directly, still bounded.
            stream = req.bounded_stream if length is not None else req.stream
            raw = stream.read(self.max_body_bytes + 1)
            if len(raw) > self.max_body_bytes:
                raise PayloadTooLarge(f"The request body exceeds {self.max_body_bytes} bytes")
            req.context.raw_body = raw
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

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        info = request_info(req)
        if resp.status_code == 413:
            info = info.without_body()
        if resp.stream is not None:
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


class SignedStream:
    """Wraps an SSE byte iterator: chains every event, adds checkpoints and the final checkpoint."""

    def __init__(self, inner, identity: Identity, request: RequestInfo, signature: str) -> None:
        self._inner = inner
        self._it = iter(inner)
        self._identity = identity
        self._request = request
        self._chain = StreamChain(signature)
        self._pending: list[bytes] = []
        self._buf = b""
        self._finished = False
        self._finish_reason: str | None = None
        self._usage: dict | None = None

    def __iter__(self):
        return self

    def __next__(self) -> bytes:
        while not self._pending:
            if self._finished:
                raise StopIteration
            try:
                chunk = next(self._it)
            except StopIteration:
                self._finish()
                continue
            self._take(chunk)
        return self._ready()

    def attach_writer(self, write: Callable[[bytes], bool]) -> bool:
        """Pass a direct writer (appliance.web.streams) on to the inner stream, each event chained
        and checkpointed on its way. The inner stream calls it only while this stream's greenlet
        waits for events (Generation.events), so never alongside __next__."""
        attach = getattr(self._inner, "attach_writer", None)
        if attach is None:
            return False

        def signed(chunk: bytes) -> bool:
            # The usual chunk, one token's event, straight through (this runs between two decodes,
            # cache-cold: every call counts); anything else the way __next__ takes it.
            if (
                self._buf or self._finished or self._pending or chunk.find(b"\n\n") != len(chunk) - 2
                or chunk == SSE_DONE
            ):
                self._take(chunk)
                return write(self._ready()) if self._pending else True
            return write(self._chained(chunk))

        return attach(signed)

    def _take(self, chunk: bytes) -> None:
        if not self._buf and chunk.find(b"\n\n") == len(chunk) - 2:  # one whole event: the usual chunk
            self._event(chunk)
            return
        self._buf += chunk
        while b"\n\n" in self._buf:
            event, self._buf = self._buf.split(b"\n\n", 1)
            self._event(event + b"\n\n")

    def _ready(self) -> bytes:
        # Everything ready goes out in one write (an event and its checkpoint line: one send, not two).
        out = b"".join(self._pending) if len(self._pending) > 1 else self._pending[0]
        self._pending.clear()
        return out

    def _event(self, event: bytes) -> None:
        if self._finished:
            return
        if event == SSE_DONE:
            self._finish()
            return
        self._pending.append(self._chained(event))

    def _chained(self, event: bytes) -> bytes:
        """The event as it goes out: chained, followed by a checkpoint line when one is due."""
        self._observe(event)
        self._chain.add(event)
        if checkpoint_due(self._chain.seq):
            return event + self._identity.stream_checkpoint(self._chain)
        return event

    def _observe(self, event: bytes) -> None:
        # What the final checkpoint attests besides the chain: how generation ended, and usage.
        if not event.startswith(b"data: "):
            return
        # Most events are token deltas: every finish_reason null, no usage, no error. Skip parsing those
        # (a JSON string value cannot hold an unescaped '"', so text never fakes these byte patterns).
        if (
            b'"usage"' not in event
            and b'"error"' not in event
            and event.count(b'"finish_reason"') == event.count(b'"finish_reason":null')
        ):
            return
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            self._finish_reason = "error"
            return
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict) and choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        if obj.get("usage"):
            self._usage = obj["usage"]

    def _finish(self) -> None:
        if self._finished:
            return
        if self._buf:  # bytes after the last complete event: chain them too, never drop them
            tail, self._buf = self._buf, b""
            self._event(tail + b"\n\n")
        self._finished = True
        self._pending.append(self._identity.stream_final(self._chain, self._request, self._finish_reason, self._usage))
        self._pending.append(SSE_DONE)

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()
