"""The cross-thread mailbox between a request's greenlet and its model's scheduler thread."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator

import gevent
from gevent.hub import Waiter

from appliance.engine.events import Delta, DeltaSink, Done, Event, Failed, GenerationRequest
from appliance.osthreads import real_lock

__all__ = ["Generation"]

log = logging.getLogger("appliance.engine")


class Generation:
    """The greenlet's side of one request: iterate its events; cancel() frees the slot within a step.

    The scheduler thread appends events to a deque and calls `send()` on this generation's async
    watcher, the one libev primitive that may be poked from another thread. The watcher stays started
    for the generation's life, so no wake-up is lost and the loop stays alive while we wait. Its
    callback, run by the hub, switches straight into the waiting greenlet (a gevent Event would
    schedule that switch for another turn of the loop: measurable per token).

    A streaming consumer may instead have its deltas handed to a sink on the scheduler thread, between
    two decodes (see `events(sink=...)`): then a streamed token costs no turn of the event loop at all.
    """

    def __init__(self, request: GenerationRequest) -> None:
        self.request = request
        self.cancelled = False  # written by the greenlet, read by the scheduler thread (a plain bool)
        self.finished = False
        self._dones = 0  # choices ended (n of them end the request)
        self._items: deque[Event] = deque()  # appended to by the scheduler thread (deque.append is atomic)
        self._waiter: Waiter | None = None  # set while the greenlet waits for items
        self._watcher_lock = real_lock()  # a real lock: close() and _wake() race across threads
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._on_wake)
        self._sink: DeltaSink | None = None
        # A real lock over "is there a sink? else queue": setting a sink only while nothing is queued,
        # atomically with the scheduler's choice, is what keeps the order of events.
        self._sink_lock = real_lock()

    def _on_wake(self) -> None:  # the hub, when the watcher fires
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.switch(None)

    def _wake(self) -> None:  # scheduler thread
        with self._watcher_lock:
            if self._watcher is not None:
                self._watcher.send()

    def _put_delta(self, delta: Delta) -> bool:
        """Scheduler thread: a streamed delta to the sink, or else to the queue; True if queued."""
        with self._sink_lock:
            sink = self._sink
            if sink is not None:
                try:
                    if not sink(delta):
                        self._sink = None
                    return False
                except Exception:
                    # A bug, not the client: the greenlet carries on from this delta (a signed stream's
                    # client would see the mismatch, never silently wrong text).
                    log.error("a stream's direct writer failed; its greenlet takes over", exc_info=True)
                    self._sink = None
            self._items.append(delta)
            return True

    def events(self, sink: DeltaSink | None = None) -> Iterator[Event]:
        """Yield the events in order. With `sink`, whenever this greenlet would wait with nothing
        queued (so everything yielded so far has been consumed), the deltas that follow go to
        `sink(delta)` on the scheduler thread instead: it takes the delta and returns whether to go
        on; False hands the next ones back to this iterator (and the sink is offered again at the next
        wait). Done and Failed always come through here. The sink must never block."""
        try:
            while not self.finished:
                while self._items:
                    event = self._items.popleft()
                    if isinstance(event, Failed):
                        self.finished = True
                    elif isinstance(event, Done):
                        self._dones += 1
                        self.finished = self._dones >= self.request.n
                    yield event
                    if self.finished:
                        return
                if self.cancelled:  # the client is gone: stop waiting, the scheduler frees the slot
                    return
                if sink is not None and self._sink is None:  # only this greenlet sets it
                    with self._sink_lock:
                        if not self._items:
                            self._sink = sink
                    if self._items:
                        continue  # events came first: yield those, then offer the sink again
                # Nothing can arrive unseen in between: the hub (which runs _on_wake) is this thread,
                # and a send() made before the waiter is set still fires once we switch to the hub.
                self._waiter = Waiter()
                self._waiter.get()
        finally:
            self._waiter = None
            self.close()

    def cancel(self) -> None:
        """Abandon the request (client gone): the slot is freed within a step, the waiter returns."""
        self.cancelled = True
        self._wake()  # the watcher wakes the waiting greenlet (from any thread or greenlet)

    def close(self) -> None:
        if not self.finished:
            self.cancelled = True
        # Waits out a sink call under way (it never blocks): none runs after this, which matters
        # because the server closes the client's socket once the response is closed, and its fd
        # number may then be reused by another connection.
        with self._sink_lock:
            self._sink = None
        with self._watcher_lock:
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None
