"""Streamed tokens written to the client's socket by the model's scheduler thread.

Normally each streamed token wakes the event loop, which formats it and writes it while the next
decode runs. When the decode threads take every CPU, that turn of the loop (about 0.2 ms of CPU per
token, most of it libev and the WSGI write path) lands inside the decode and stalls it. Written by
the scheduler thread between two decodes instead, a token costs one non-blocking write() and no turn
of the loop (measured: 2-3% more tokens per second for one stream on 2 cores; see the README).

`DirectWrites` wraps the WSGI app under gunicorn. A streamed response that can use it has an
`attach_writer(write)` method (the signing layer passes it on, chaining each event before it goes);
the response asks its generation to hand deltas to `write` only once everything it yielded before
is on the wire (Generation.events). `SocketWriter.write` never blocks: what the socket does not take
is kept and the response's greenlet sends it, in order, before its next item.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator

from gunicorn.http.wsgi import Response as _GunicornResponse

__all__ = ["DirectWrites", "SocketWriter"]


class SocketWriter:
    """Writes response body bytes to a non-blocking socket from any thread, framed as gunicorn frames
    them (HTTP/1.1 chunks, or raw for HTTP/1.0); never blocks, never raises."""

    def __init__(
        self, sock, *, chunked: bool, headers_sent: Callable[[], bool], send_headers: Callable[[], None]
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

    def __iter__(self):
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

    def __init__(self, app) -> None:
        self._app = app

    def __call__(self, environ, start_response):
        result = self._app(environ, start_response)
        attach = getattr(result, "attach_writer", None)
        if attach is None:
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
        if not attach(writer.write):
            return result
        return _Flushing(result, writer)
