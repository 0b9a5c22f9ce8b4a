"""A tampering HTTP proxy for the browser tests: it forwards every connection to the appliance byte
for byte, except that in each event-stream response it changes one byte of one streamed event (the
`K` in the first `chat.completion.chunk`, so the JSON stays valid and the page still shows the text):
the chain must then fail."""

from __future__ import annotations

import socket
import threading

NEEDLE = b'"chat.completion.chunk"'
ALTERED = b'"chat.completion.chunK"'


class TamperingProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.tampered = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, responses: bool) -> None:
        armed = False  # inside an event-stream response, not yet altered
        try:
            while data := src.recv(65536):
                if responses:
                    if b"text/event-stream" in data:
                        armed = True
                    if armed and NEEDLE in data:
                        data = data.replace(NEEDLE, ALTERED, 1)
                        armed = False
                        with self._lock:
                            self.tampered += 1
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        self.listener.close()
