"""WebSocket mode of the Responses API: `GET /v1/responses` upgraded (OpenAI's Responses WebSocket).

The client sends `{"type": "response.create", ...}` with the fields of `POST /v1/responses`; the
appliance answers with the same typed events as the SSE stream, one JSON text frame each, one response
in flight per connection. The protocol is wsproto's (sans-IO) over the socket gunicorn puts in the
WSGI environ: the upgrade's resource writes a signed `101`, runs the session in its own greenlet, and
tells the server wrapper (`Upgraded`) that gunicorn must write nothing more on that connection.

Signing (spec/signing.md §8): the 101 response is signed like a stream's headers
(`appliance-stream: sha256-ws-chain-v1`); every server frame is chained from its signature; signed
checkpoints travel in-band (`{"type": "appliance.checkpoint", ...}`), and after each response a signed
final (`{"type": "appliance.final", ...}`) binds both directions: the server's frames and the client's
frames the appliance took. Pings are answered; a connection idle for `server.websocket_idle_timeout`
is closed (1000); SIGTERM closes idle connections with 1001 once their response (if any) is done.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.lock import Semaphore
from gevent.queue import Empty, Queue
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from appliance.trust.identity import Identity
from appliance.web.errors import ApiError, InternalError, to_api_error
from appliance.web.streams import StreamOutcome, checkpoint_due
from attestation.signing import RequestInfo, WebSocketChain

__all__ = ["UPGRADED", "upgrade_problem", "Session", "Turn", "handshake_headers"]

log = logging.getLogger("appliance.http")

UPGRADED = "appliance.upgraded"
"""Set in the WSGI environ once the connection belongs to a WebSocket session (web/server.py)."""

_CLOSED = object()


def upgrade_problem(headers: dict[str, str]) -> str | None:
    """Why a request is not a WebSocket upgrade (RFC 6455 §4.2.1), or None. Header names lower case."""
    if "websocket" not in headers.get("upgrade", "").lower():
        return "GET /v1/responses is the WebSocket mode: send Upgrade: websocket (POST creates a response over HTTP)"
    if "upgrade" not in [t.strip() for t in headers.get("connection", "").lower().split(",")]:
        return "Connection: Upgrade is required"
    if headers.get("sec-websocket-version") != "13":
        return "Sec-WebSocket-Version: 13 is required"
    if not headers.get("sec-websocket-key"):
        return "Sec-WebSocket-Key is required"
    return None


def handshake_headers(key: str) -> dict[str, str]:
    return {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Accept": generate_accept_token(key.encode()).decode()}


@dataclass
class Turn:
    """One response's events (SSE `data:` payloads) and how it ended, from the Responses resource."""

    events: Iterator[bytes]
    outcome: StreamOutcome
    close: Callable[[], None]


class Session:
    """One upgraded connection: reads frames in one greenlet, answers in another (the request's)."""

    def __init__(
        self,
        sock: socket.socket,
        identity: Identity,
        request: RequestInfo,
        signature: str,
        start: Callable[[dict[str, Any], bytes], Turn],
        *,
        max_message: int,
        idle_timeout: float,
        stopping: Callable[[], bool],
        rate_limit: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self._identity = identity
        self._request = request
        self._chain = WebSocketChain(signature)
        self._start = start
        self._max = max_message
        self._idle = idle_timeout
        self._stopping = stopping
        self._rate_limit = rate_limit
        self._conn = Connection(ConnectionType.SERVER)
        self._send_lock = Semaphore()
        self._inbox: Queue[Any] = Queue()
        self._closed = False

    # -- the connection ----------------------------------------------------------------------------

    def run(self) -> None:
        reader = gevent.spawn(self._read)
        try:
            self._serve()
        finally:
            reader.kill(block=True, timeout=5)  # before gunicorn closes the socket it was reading

    def _serve(self) -> None:
        idle = 0.0
        while not self._closed:
            try:
                item = self._inbox.get(timeout=1.0)
            except Empty:
                idle += 1.0
                if self._stopping():
                    self._close(1001, "the appliance is shutting down")
                elif self._idle and idle >= self._idle:
                    self._close(1000, "idle")
                continue
            idle = 0.0
            if item is _CLOSED:
                return
            self._message(item)

    def _read(self) -> None:
        """Frames in: pings answered at once, text messages (whole, bounded) to the inbox."""
        parts: list[str] = []
        size = 0
        try:
            while not self._closed:
                data = self._sock.recv(65536)
                self._conn.receive_data(data or None)
                for ev in self._conn.events():
                    if isinstance(ev, Ping):
                        self._send_raw(self._conn.send(ev.response()))
                    elif isinstance(ev, CloseConnection):
                        if not self._closed:
                            self._closed = True
                            self._send_raw(self._conn.send(ev.response()))
                        self._inbox.put(_CLOSED)
                        return
                    elif isinstance(ev, TextMessage):
                        size += len(ev.data.encode())
                        if size > self._max:
                            self._error(ApiError(f"A message larger than {self._max} bytes (limits.max_body_bytes)",
                                                 code="message_too_large"))
                            self._close(1009, "message too large")
                            self._inbox.put(_CLOSED)
                            return
                        parts.append(ev.data)
                        if ev.message_finished:
                            self._inbox.put("".join(parts))
                            parts, size = [], 0
                    elif isinstance(ev, BytesMessage):
                        if ev.message_finished:
                            self._error(ApiError("Binary frames are not part of this protocol: send JSON text frames",
                                                 code="invalid_frame"))
                if not data:
                    break
        except (OSError, Exception) as e:  # a reset connection, or a protocol error from wsproto
            if not self._closed:
                log.info("websocket: connection ended (%s)", type(e).__name__)
        self._closed = True
        self._inbox.put(_CLOSED)

    def _send_raw(self, data: bytes) -> None:
        with self._send_lock:
            try:
                self._sock.sendall(data)
            except OSError:
                self._closed = True

    def _frame(self, payload: bytes, *, chained: bool = True) -> None:
        if self._closed:
            return
        if chained:
            self._chain.sent(payload)
        self._send_raw(self._conn.send(TextMessage(data=payload.decode())))
        if chained and checkpoint_due(self._chain.server.seq):
            fields = self._identity.ws_checkpoint(self._chain)
            self._frame(_json({"type": "appliance.checkpoint", "checkpoint": fields}), chained=False)

    def _close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            with self._send_lock:
                self._sock.sendall(self._conn.send(CloseConnection(code=code, reason=reason)))
        except Exception:  # the peer is gone or the state machine already closed: nothing to say
            pass

    def _error(self, err: ApiError) -> None:
        self._frame(_json({"type": "error", **err.body()}))

    # -- one message -------------------------------------------------------------------------------

    def _message(self, text: str) -> None:
        raw = text.encode()
        self._chain.took(raw)  # every text message the appliance reads, in order (spec/signing.md §8)
        try:
            event = json.loads(text)
        except ValueError:
            self._error(ApiError("The message is not valid JSON", code="invalid_json"))
            return
        if not isinstance(event, dict) or event.get("type") != "response.create":
            kind = event.get("type") if isinstance(event, dict) else None
            self._error(ApiError(f"Unknown event type {kind!r}: this server takes response.create", param="type",
                                 code="unknown_event_type"))
            return
        try:
            if self._rate_limit is not None:
                self._rate_limit()
            body = {k: v for k, v in event.items() if k not in ("type", "event_id")}
            turn = self._start(body, raw)
        except Exception as e:  # the same table as HTTP errors (engine, trust, store): an error frame
            err = to_api_error(e, prompt_param="input")
            if err is None:  # a bug: logged like a 500, answered without its details
                log.error("websocket: response.create failed", exc_info=True)
                err = InternalError("The server failed to start this response")
            self._error(err)
            return
        try:
            for sse in turn.events:
                self._refuse_overlapping()
                payload = sse[len(b"data: "):].rstrip(b"\n")
                if payload.startswith(b'{"error"'):  # an SSE error event: OpenAI's WebSocket shape
                    payload = b'{"type":"error",' + payload[1:]
                self._frame(payload)
        finally:
            turn.close()
        o = turn.outcome
        final = self._identity.ws_final(self._chain, self._request, o.finish_reason, o.usage, o.conversation)
        self._frame(_json({"type": "appliance.final", "final": final}), chained=False)

    def _refuse_overlapping(self) -> None:
        """A message that arrives while a response is in flight: one response per connection at a time."""
        while True:
            try:
                item = self._inbox.get_nowait()
            except Empty:
                return
            if item is _CLOSED:
                self._inbox.put(_CLOSED)
                return
            self._chain.took(item.encode())
            self._error(ApiError("A response is already in flight on this connection: wait for its final event",
                                 code="response_in_flight"))


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()

