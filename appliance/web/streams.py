"""Streamed response bodies: the typed protocol they share, signing, and writing to the socket.

Every streamed body is an `SseBody`: an iterable of SSE events that can also take a direct writer
and says how its generation ended (`outcome`). `GenerationStream` is the one the completion routes
return; `SignedStream` (the signing middleware) wraps it, chaining and checkpointing each event.

Streamed tokens may be written to the client's socket by the model's scheduler thread. Normally each
streamed token wakes the event loop, which formats it and writes it while the next decode runs. When
the decode threads take every CPU, that turn of the loop (about 0.2 ms of CPU per token, most of it
libev and the WSGI write path) lands inside the decode and stalls it. Written by the scheduler thread
between two decodes instead, a token costs one non-blocking write() and no turn of the loop
(measured: 2-3% more tokens per second for one stream on 2 cores; see the README).

`DirectWrites` wraps the WSGI app under gunicorn and offers an `SseBody` a `SocketWriter.write`
(`attach_writer`); the body asks its generation to hand deltas to `write` only once everything it
yielded before is on the wire (Generation.events). `SocketWriter.write` never blocks: what the socket
does not take is kept and the response's greenlet sends it, in order, before its next item.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import gevent
from gevent.socket import wait_read
from gunicorn.http.wsgi import Response as _GunicornResponse

from appliance.engine.mailbox import Generation
from appliance.trust.identity import Identity
from attestation.signing import SSE_DONE, RequestInfo, StreamChain

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "Writer", "StreamOutcome", "SseBody", "GenerationStream", "DirectOut", "SignedStream", "watch_disconnect",
    "DirectWrites", "SocketWriter", "checkpoint_due",
]

Writer = Callable[[bytes], bool]
"""Takes body bytes from any thread without blocking; returns whether they went out and more may follow."""

CHECKPOINT_EVERY = 16  # data events between signed checkpoints, once the stream is under way
_EARLY_CHECKPOINTS = frozenset({1, 2, 4, 8})  # so a verifying client can release the first tokens at once


def checkpoint_due(seq: int) -> bool:
    return seq in _EARLY_CHECKPOINTS or seq % CHECKPOINT_EVERY == 0


@dataclass
class StreamOutcome:
    """How a stream's generation ended, set by the body as it yields its last events."""

    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    conversation: tuple[bytes, bytes] | None = None
    """(prev, head) of a conversation's turn (POST /v1/responses), signed in the final line."""


@runtime_checkable
class SseBody(Protocol):
    outcome: StreamOutcome

    def __iter__(self) -> Iterator[bytes]: ...

    def close(self) -> None: ...

    def attach_writer(self, write: Writer) -> bool:
        """Called before iteration starts; True if token chunks will go to `write`."""
        ...


class DirectOut:
    """Where a stream's token chunks go once the server attaches a direct writer."""

    write: Writer | None = None


class GenerationStream:
    """A generation's SSE body; close() (called by the server, also on disconnect) cancels it."""

    def __init__(
        self, it: Iterator[bytes], outcome: StreamOutcome, on_close: Callable[[], None], direct: DirectOut | None = None
    ) -> None:
        self._it = it
        self.outcome = outcome
        self._on_close = on_close
        self._direct = direct

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._it)  # iterated directly: no extra Python frame per token

    def attach_writer(self, write: Writer) -> bool:
        if self._direct is None:
            return False
        self._direct.write = write
        return True

    def close(self) -> None:
        try:
            close = getattr(self._it, "close", None)
            if close:
                close()
        finally:
            self._on_close()


class Cancellable(Protocol):
    def cancel(self) -> None: ...


def watch_disconnect(sock: socket.socket | None, gen: Cancellable) -> gevent.Greenlet | None:
    """Cancel the generation (or embedding job) when the client closes its connection (EOF or error on
    the socket)."""
    if sock is None:
        return None

    def watch() -> None:
        try:
            wait_read(sock.fileno())
            if sock.recv(1, socket.MSG_PEEK) == b"":
                gen.cancel()
        except OSError:
            gen.cancel()

    return gevent.spawn(watch)


def finish(gen: Generation, watcher: gevent.Greenlet | None) -> None:
    gen.close()
    if watcher is not None:
        watcher.kill(block=False)


class SignedStream:
    """Wraps an SSE body: chains every event, adds checkpoints and the final checkpoint, which also
    attests how generation ended and its usage (the body's `outcome`, never re-read from its JSON)."""

    def __init__(self, inner: SseBody, identity: Identity, request: RequestInfo, signature: str) -> None:
        self._inner = inner
        self._it = iter(inner)
        self._identity = identity
        self._request = request
        self._chain = StreamChain(signature)
        self._pending: list[bytes] = []
        self._buf = b""
        self._finished = False

    @property
    def outcome(self) -> StreamOutcome:
        return self._inner.outcome

    def __iter__(self) -> SignedStream:
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

    def attach_writer(self, write: Writer) -> bool:
        """Pass a direct writer on to the inner stream, each event chained and checkpointed on its
        way. The inner stream calls it only while this stream's greenlet waits for events
        (Generation.events), so never alongside __next__."""

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

        return self._inner.attach_writer(signed)

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
        self._chain.add(event)
        if checkpoint_due(self._chain.seq):
            return event + self._identity.stream_checkpoint(self._chain)
        return event

    def _finish(self) -> None:
        if self._finished:
            return
        if self._buf:  # bytes after the last complete event: chain them too, never drop them
            tail, self._buf = self._buf, b""
            self._event(tail + b"\n\n")
        self._finished = True
        outcome = self._inner.outcome
        self._pending.append(
            self._identity.stream_final(self._chain, self._request, outcome.finish_reason, outcome.usage, outcome.conversation)
        )
        self._pending.append(SSE_DONE)

    def close(self) -> None:
        self._inner.close()


class _Socket(Protocol):
    """The socket SocketWriter writes to: a gevent socket (its fd non-blocking)."""

    def fileno(self) -> int: ...

    def sendall(self, data: bytes, /) -> None: ...


class SocketWriter:
    """Writes response body bytes to a non-blocking socket from any thread, framed as gunicorn frames
    them (HTTP/1.1 chunks, or raw for HTTP/1.0); never blocks, never raises."""

    def __init__(
        self, sock: _Socket, *, chunked: bool, headers_sent: Callable[[], bool], send_headers: Callable[[], None]
    ) -> None:
        self._sock = sock  # a gevent socket: its fd is non-blocking
        self._fd = sock.fileno()
        self._chunked = chunked
        self._headers_sent = headers_sent
        self._send_headers = send_headers
        self._pending: list[bytes] = []
        self._started = False  # the headers are out (they are never un-sent: asked until they are)

    def write(self, data: bytes) -> bool:
        """Put `data` on the wire or keep it for flush(); True if it went out and more may follow."""
        if not data:
            return True  # an empty chunk would end a chunked body
        frame = b"%X\r\n%b\r\n" % (len(data), data) if self._chunked else data
        if self._pending or not (self._started or self._headers_sent()):
            self._pending.append(frame)
            return False
        self._started = True
        try:
            n = os.write(self._fd, frame)
        except OSError:  # EAGAIN (the client reads slowly), or the client is gone: flush() meets it
            n = 0
        if n < len(frame):
            self._pending.append(frame[n:])
            return False
        return True

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def flush(self) -> None:
        """The response's greenlet: send the headers if not yet sent, then what write() could not
        (cooperatively blocking)."""
        if not self._headers_sent():
            self._send_headers()
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._sock.sendall(data)


class _Flushing:
    """The response iterable, with the writer's leftovers sent before each item and at the end."""

    def __init__(self, inner: Iterable[bytes], writer: SocketWriter) -> None:
        self._inner = inner
        self._it: Iterator[bytes] = iter(inner)
        self._writer = writer

    def __iter__(self) -> _Flushing:
        return self

    def __next__(self) -> bytes:
        self._writer.flush()  # the first time, the headers: the writer may then write at once
        try:
            item = next(self._it)
        except StopIteration:
            self._writer.flush()
            raise
        self._writer.flush()
        return item

    def close(self) -> None:
        close = getattr(self._inner, "close", None)
        if close is not None:
            close()


class DirectWrites:
    """WSGI wrapper (plain HTTP under gunicorn only): offers streamed responses a SocketWriter."""

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        result = self._app(environ, start_response)
        if not isinstance(result, SseBody):
            return result
        resp = getattr(start_response, "__self__", None)
        if (
            not isinstance(resp, _GunicornResponse)
            or resp.status is None  # start_response not called yet: nothing known about the framing
            or environ.get("wsgi.url_scheme") != "http"  # TLS: only the event loop's socket may write
        ):
            return result
        writer = SocketWriter(
            resp.sock, chunked=resp.chunked, headers_sent=lambda: resp.headers_sent, send_headers=resp.send_headers
        )
        if not result.attach_writer(writer.write):
            return result
        return _Flushing(result, writer)
