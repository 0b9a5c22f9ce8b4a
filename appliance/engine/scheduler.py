"""Continuous batching: one scheduler thread per loaded model owns its llama context.

Each step decodes one batch holding the next token of every generating sequence plus prompt chunks
of newly admitted requests; each sequence samples with its own sampler chain. Results go back to the
waiting greenlets through each generation's libev async watcher, whose `send()` is the
gevent-safe way in from another thread. Requests come in through a C-level SimpleQueue, which gevent
does not patch, so the scheduler thread blocks on it as a real thread.
"""

from __future__ import annotations

import codecs
import logging
import math
import time
from _queue import SimpleQueue  # the C queue: never monkey-patched, safe between a greenlet and a thread
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import gevent
import numpy as np
from gevent import monkey
from gevent.hub import Waiter

from appliance.engine.llama import Batch, LlamaContext, LlamaModel, SamplerChain, SamplingParams
from appliance.web.errors import ApiError, ContextLengthExceeded, EngineFailure, ModelNotFound, Overloaded

__all__ = [
    "GenerationRequest",
    "Generation",
    "Delta",
    "DeltaSink",
    "Done",
    "Failed",
    "Usage",
    "Timings",
    "TokenLogprob",
    "ModelEngine",
    "EngineObserver",
]

log = logging.getLogger("appliance.engine")

_start_thread = monkey.get_original("_thread", "start_new_thread")
_allocate_lock = monkey.get_original("_thread", "allocate_lock")
_MIN_REUSE = 16
"""Cached tokens worth keeping: a prefix this long is reused (and copied to another slot if need be);
a shorter one only when the prompt continues the whole cached sequence."""


# ---------------------------------------------------------------------------------------------
# What a request asks for and what comes back


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the k most likely alternatives."""
    n_threads: int | None = None
    n_ctx: int | None = None
    """A per-request context cap (the original API's n_ctx), at most the slot's context."""
    stream: bool = True
    """False: the consumer wants the whole answer, so its greenlet is woken once, at the end, rather
    than for every token (each wake-up costs both threads CPU that the decode would otherwise get)."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...]


@dataclass(frozen=True)
class Delta:
    text: str
    n_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Timings:
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    queued_ms: float

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n / (self.predicted_ms / 1000) if self.predicted_ms > 0 else 0.0


@dataclass(frozen=True)
class Done:
    finish_reason: str
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Failed:
    error: ApiError


Event = Delta | Done | Failed
DeltaSink = Callable[[Delta], bool]
"""Takes a streamed delta on the scheduler thread; returns whether to go on (see Generation.events)."""


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
        self._items: deque = deque()  # appended to by the scheduler thread (deque.append is atomic)
        self._waiter: Waiter | None = None  # set while the greenlet waits for items
        self._watcher_lock = _allocate_lock()  # a real lock: close() and _wake() race across threads
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._on_wake)
        self._sink: DeltaSink | None = None
        # A real lock over "is there a sink? else queue": setting a sink only while nothing is queued,
        # atomically with the scheduler's choice, is what keeps the order of events.
        self._sink_lock = _allocate_lock()

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
                    if isinstance(event, (Done, Failed)):
                        self.finished = True
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


class EngineObserver(Protocol):
    def first_token(self, model: str, seconds: float) -> None: ...
    def tokens_generated(self, model: str, n: int) -> None: ...
    def prompt_tokens(self, model: str, n: int) -> None: ...


class _NullObserver:
    def first_token(self, model: str, seconds: float) -> None:
        pass

    def tokens_generated(self, model: str, n: int) -> None:
        pass

    def prompt_tokens(self, model: str, n: int) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# The scheduler


@dataclass
class _Slot:
    seq: int
    kv: list[int] = field(default_factory=list)
    """Tokens in this sequence's KV cache, positions 0..len-1 (kept after a request for prefix reuse)."""
    last_used: float = 0.0
    gen: Generation | None = None
    req: GenerationRequest | None = None
    sampler: SamplerChain | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens not yet decoded."""
    limit: int = 0
    cached: int = 0
    n_generated: int = 0
    last_token: int = -1
    text: str = ""
    emitted: int = 0
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder | None = None
    t_queued: float = 0.0
    t_admitted: float = 0.0
    t_first: float = 0.0
    batch_index: int = -1
    n_batch_tokens: int = 0


class _PairCost:
    """Whether two generating sequences decode faster as two one-token passes than as one two-token pass.

    It depends on the kernels: llama.cpp's x86 CPU path for Q8_0 weights takes a matrix-vector
    product for one token and a tiled GEMM from two on, and here a two-token step took 21.5 ms
    against 10.3 for one, so two passes win; on a GPU one pass costs about what a one-token one does.
    So both are timed as they happen (an exponential average of llama_decode's wall time) and the
    cheaper is taken; every _PROBE-th pair step goes the other way, so that estimate stays current.
    """

    _PROBE = 32
    _MARGIN = 0.97  # split only for a clear gain: the two passes must beat 97% of one pair pass

    def __init__(self) -> None:
        self.one = 0.0
        self.pair = 0.0
        self._steps = 0

    def observe(self, n_tokens: int, seconds: float) -> None:
        if n_tokens == 1:
            self.one = seconds if not self.one else 0.8 * self.one + 0.2 * seconds
        elif n_tokens == 2:
            self.pair = seconds if not self.pair else 0.8 * self.pair + 0.2 * seconds

    def split(self) -> bool:
        """Called once per step with exactly two generating sequences and nothing to prefill."""
        self._steps += 1
        if not self.pair:
            return False  # time one pair pass first
        better = bool(self.one) and 2 * self.one < self._MARGIN * self.pair
        return not better if self._steps % self._PROBE == 0 else better


_STOP = object()
_REPORT_EVERY_S = 0.5


class ModelEngine:
    """Owns one model's context on a dedicated OS thread; `submit` is called from greenlets."""

    def __init__(
        self,
        name: str,
        model: LlamaModel,
        *,
        n_ctx: int,
        parallel: int,
        n_batch: int,
        n_threads: int,
        n_threads_batch: int,
        max_queue: int,
        flash_attn: str = "auto",
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.model = model
        self.parallel = parallel
        self.max_queue = max_queue
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self._observer = observer or _NullObserver()
        self._clock = clock
        self._inbox: SimpleQueue = SimpleQueue()
        self._lock = _allocate_lock()
        self._waiting = 0
        self._busy = 0
        self._accepting = True
        self._healthy = True
        self._exited = _allocate_lock()
        self._exited.acquire()
        # The context is created here, in the loading thread, so a failure is reported to the loader;
        # from start() on only the scheduler thread touches it.
        self._ctx = LlamaContext(
            model,
            n_ctx_seq=n_ctx,
            n_seq=parallel,
            n_batch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads_batch,
            flash_attn=flash_attn,
        )
        self.n_ctx = self._ctx.n_ctx_seq
        self._batch = Batch(self._ctx.n_batch)
        self._slots = [_Slot(seq=i) for i in range(parallel)]
        self._active: list[_Slot] = []
        """Slots serving a request, in slot order (the only ones a step has to look at)."""
        self._pairs = _PairCost()
        self._queue: deque[tuple[Generation, float]] = deque()
        self._held: list[tuple[Generation, Event]] = []
        """Events not yet handed to their greenlets: they go just before the next decode (_hand_over)."""
        self._unreported_generated = 0  # tokens not yet given to the observer (_report)
        self._unreported_prompt = 0
        self._reported_at = clock()

    # -- called from greenlets ---------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def busy_slots(self) -> int:
        return self._busy

    @property
    def healthy(self) -> bool:
        return self._healthy

    def start(self) -> None:
        _start_thread(self._thread_main, ())

    def submit(self, request: GenerationRequest) -> Generation:
        if not self._accepting:
            raise ModelNotFound(self.name)
        limit = min(self.n_ctx, request.n_ctx or self.n_ctx)
        if len(request.prompt) >= limit:
            whose = "This request's context (n_ctx)" if limit < self.n_ctx else "This model's context"
            raise ContextLengthExceeded(
                f"{whose} is {limit} tokens; the prompt has {len(request.prompt)} tokens"
                " and leaves no room for a completion",
                param="prompt",
            )
        with self._lock:
            if self._waiting >= self.max_queue + max(0, self.parallel - self._busy):
                raise Overloaded(
                    f"Model '{self.name}' has {self._waiting} requests waiting; try again shortly",
                    headers={"Retry-After": "1"},
                )
            self._waiting += 1
        gen = Generation(request)
        self._inbox.put((gen, self._clock()))
        return gen

    def stop(self, *, timeout: float = 30.0) -> bool:
        """Stop accepting, let admitted and queued requests finish, then free the context and model.

        Blocks the calling thread: from a greenlet, run it in the hub's thread pool.
        """
        self._accepting = False
        self._inbox.put(_STOP)
        done = self._exited.acquire(timeout=timeout)
        return bool(done)

    # -- the scheduler thread ----------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._loop()
        except BaseException:  # never let the thread die silently with requests waiting
            log.exception("scheduler for model %s failed", self.name)
            self._healthy = False
            self._fail_all(EngineFailure())
        finally:
            for s in self._slots:
                if s.sampler:
                    s.sampler.close()
            self._ctx.close()
            self.model.close()
            self._exited.release()

    def _loop(self) -> None:
        # Between two decodes this loop runs cache-cold (the decode has just streamed the weights
        # through every cache), so each line costs microseconds: keep the per-step path short.
        stopping = False
        inbox = self._inbox
        while True:
            if not self._active and not self._queue:
                self._hand_over()  # no decode comes next: hand the events over before blocking
                if stopping:
                    return
                stopping |= self._take(inbox.get())  # idle: block this OS thread until work arrives
            while not inbox.empty():  # drain whatever else arrived, without blocking
                stopping |= self._take(inbox.get_nowait())
            self._reap_cancelled()
            if self._queue:
                self._admit(self._held)
            if self._active:
                if self._active[-1].seq - self._active[0].seq >= len(self._active):  # a gap in the busy ids
                    self._compact()
                self._step()

    def _take(self, item) -> bool:
        if item is _STOP:
            return True
        self._queue.append(item)
        return False

    def _hand_over(self) -> None:
        """Give the held events to their greenlets: called just before a decode, or before blocking.

        The wake-up is the last thing before the decode releases the GIL, so the event loop, woken on
        the other core, does not wait for the GIL through the step's bookkeeping; it writes the tokens
        while the decode runs. (Waiting for it first, as this scheduler once did, measured 1-3% slower
        at 1 to 8 streams.)
        """
        if self._held:
            held, self._held = self._held, []
            self._deliver(held)

    def _deliver(self, out: list[tuple[Generation, Event]]) -> None:
        woken: list[Generation] = []
        for gen, ev in out:
            if type(ev) is not Delta:
                gen._items.append(ev)
            elif not gen.request.stream:
                gen._items.append(ev)
                continue  # woken once, by its Done or Failed
            elif not gen._put_delta(ev):
                continue  # written by the generation's sink: nobody to wake
            if not woken or woken[-1] is not gen:
                woken.append(gen)  # one generation's events of a step are adjacent
        for gen in woken:
            gen._wake()

    def _fail_all(self, error: ApiError) -> None:
        out, self._held = self._held, []
        for s in self._slots:
            if s.gen is not None:
                out.append((s.gen, Failed(error)))
                self._release(s)
        while self._queue:
            gen, _ = self._queue.popleft()
            self._dec_waiting()
            out.append((gen, Failed(error)))
        while True:
            try:
                item = self._inbox.get_nowait()
            except Exception:
                break
            if item is not _STOP:
                self._dec_waiting()
                out.append((item[0], Failed(error)))
        self._deliver(out)

    def _dec_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _report(self, now: float) -> None:
        """Token counts go to the observer in batches: at most every _REPORT_EVERY_S, and whenever a
        request ends, so a scrape after a response sees all of its tokens. (A per-step update was a
        lock and some lookups, cache-cold, on the path between two decodes.)"""
        if self._unreported_generated:
            self._observer.tokens_generated(self.name, self._unreported_generated)
            self._unreported_generated = 0
        if self._unreported_prompt:
            self._observer.prompt_tokens(self.name, self._unreported_prompt)
            self._unreported_prompt = 0
        self._reported_at = now

    def _release(self, s: _Slot) -> None:
        self._report(self._clock())
        if s.sampler:
            s.sampler.close()
        if s.gen is not None:
            self._active.remove(s)
        s.sampler = None
        s.gen = None
        s.req = None
        s.pending = []
        s.last_used = self._clock()
        with self._lock:
            self._busy -= 1

    def _reap_cancelled(self) -> None:
        for s in [s for s in self._active if s.gen.cancelled]:
            self._release(s)
        if self._queue and any(gen.cancelled for gen, _ in self._queue):  # gone before a slot freed: stop counting them
            kept = deque(item for item in self._queue if not item[0].cancelled)
            for _ in range(len(self._queue) - len(kept)):
                self._dec_waiting()
            self._queue = kept

    def _admit(self, out: list) -> None:
        while self._queue:
            free = [s for s in self._slots if s.gen is None]
            if not free:
                return
            gen, t_queued = self._queue.popleft()
            if gen.cancelled:
                self._dec_waiting()
                continue
            req = gen.request
            prompt = list(req.prompt)
            # Which slot: llama.cpp decodes a split KV cache's sequences together only while their ids
            # are consecutive (each gap costs another pass over all the weights), so prefer the free
            # slot that keeps the busy ones contiguous; among those, prefix reuse (the free slot whose
            # cached tokens share the longest prefix with this prompt: the next turn of a chat, a common
            # system prompt), then the least recently used. A much longer cached prefix elsewhere still
            # wins: _compact() then copies it into place, which is cheaper than recomputing it.
            busy = {a.seq for a in self._active}
            shared = {a.seq: _common_prefix(a.kv, prompt) for a in free}
            worth = {a.seq: _worth_taking(shared[a.seq], len(a.kv), len(prompt)) for a in free}
            contiguous = min(free, key=lambda a: (_runs(busy | {a.seq}), -worth[a.seq], a.last_used))
            reuse = min(free, key=lambda a: (-worth[a.seq], a.last_used))
            s = reuse if worth[reuse.seq] >= worth[contiguous.seq] + _MIN_REUSE else contiguous
            # Whatever the slot, what it shares is reused (a BOS token is a prompt token less to decode).
            keep = min(shared[s.seq], len(prompt) - 1)  # at least one token must be decoded for logits
            if keep < len(s.kv):
                if not self._ctx.seq_rm(s.seq, keep, -1):
                    self._ctx.seq_rm(s.seq, -1, -1)
                    keep = 0
                del s.kv[keep:]
            try:
                sampler = SamplerChain(self.model, req.sampling)
            except Exception:
                log.exception("sampler setup failed")
                self._dec_waiting()
                out.append((gen, Failed(EngineFailure())))
                continue
            with self._lock:  # one step, so submit() never sees the request in neither count
                self._waiting -= 1
                self._busy += 1
            s.gen, s.req, s.sampler = gen, req, sampler
            self._active.append(s)
            self._active.sort(key=lambda a: a.seq)
            s.pending = prompt[keep:]
            s.cached = keep
            s.limit = min(self.n_ctx, req.n_ctx or self.n_ctx)
            s.n_generated = 0
            s.last_token = -1
            s.text, s.emitted, s.held_logprobs = "", 0, []
            s.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            s.t_queued, s.t_admitted, s.t_first = t_queued, self._clock(), 0.0

    def _compact(self) -> None:
        """Make the busy slots' sequence ids consecutive again (a request finished between others).

        llama.cpp splits a batch wherever the sequence ids of a split KV cache jump, and each part
        reads all the weights again: busy slots {0, 2, 3} cost two passes per step, {0, 1, 2} one.
        So move the fewest sequences into the gaps: copy a sequence's KV stream to a free slot's
        (applied by the next decode) and swap the two slots' ids; the stream left behind keeps its
        tokens as that free slot's prefix cache. Each move costs one copy of a stream's KV, once.
        """
        n = len(self._active)
        busy = {a.seq for a in self._active}
        start = max(range(self.parallel - n + 1), key=lambda b: (len(busy & set(range(b, b + n))), -b))
        window = range(start, start + n)
        holes = [i for i in window if i not in busy]
        movers = [a for a in self._active if a.seq not in window]
        for mover, hole in zip(movers, holes):
            free = self._slots[hole]
            self._ctx.seq_cp(mover.seq, hole)
            mover.seq, free.seq = hole, mover.seq
            self._slots[mover.seq], self._slots[free.seq] = mover, free
            free.kv = list(mover.kv)
            free.last_used = self._clock()
        self._active.sort(key=lambda a: a.seq)

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        in_batch: list[_Slot] = []
        prefilling: list[_Slot] = []
        hinted = False
        # Generating sequences first: one token each, so streams never stall behind a long prompt.
        for s in self._active:
            if s.pending:
                prefilling.append(s)
            else:
                s.batch_index = batch.add_one(s.last_token, len(s.kv), s.seq)
                s.n_batch_tokens = 1
                in_batch.append(s)
            hinted = hinted or bool(s.req.n_threads)
        if prefilling:
            budget = batch.capacity - batch.n
            prefilling.sort(key=lambda s: s.t_admitted)
            for s in prefilling:
                if budget <= 0:
                    break
                chunk = s.pending[:budget]
                last = len(chunk) == len(s.pending)
                idx = batch.add(chunk, len(s.kv), s.seq, last)
                s.batch_index = idx if last else -1
                s.n_batch_tokens = len(chunk)
                budget -= len(chunk)
                in_batch.append(s)
        # A step runs with the largest n_threads hint among its sequences, capped by the model's.
        threads_hint = max((s.req.n_threads or 0 for s in in_batch), default=0) if hinted else 0
        if threads_hint:
            self._ctx.set_threads(min(threads_hint, self.n_threads), min(threads_hint, self.n_threads_batch))
        else:
            self._ctx.set_threads(self.n_threads, self.n_threads_batch)

        # Usually one pass; two generating sequences alone may go as two one-token passes (_PairCost).
        # Each pass samples before the next decode overwrites the logits (so not with logprobs, which
        # read them after the step).
        passes = [in_batch]
        if (
            not prefilling
            and len(in_batch) == 2
            and in_batch[0].req.logprobs is None
            and in_batch[1].req.logprobs is None
            and self._pairs.split()
        ):
            passes = [in_batch[:1], in_batch[1:]]
        sampled: list[int] = []
        timed = not prefilling and len(in_batch) <= 2  # the steps _PairCost learns from
        for group in passes:
            if len(passes) > 1:
                batch.clear()
                s = group[0]
                s.batch_index = batch.add_one(s.last_token, len(s.kv), s.seq)
            if self._held:
                self._hand_over()
            t0 = self._clock() if timed else 0.0
            rc = self._ctx.decode(batch)
            if rc != 0:
                log.error("llama_decode returned %d for model %s", rc, self.name)
                err = Overloaded("No room in the model's cache; try again", headers={"Retry-After": "1"}) if rc == 1 else EngineFailure()
                for s in in_batch:
                    self._held.append((s.gen, Failed(err)))
                    self._ctx.seq_rm(s.seq, -1, -1)
                    s.kv.clear()
                    self._release(s)
                return
            if timed:
                self._pairs.observe(batch.n, self._clock() - t0)
            for s in group:
                sampled.append(s.sampler.sample(self._ctx, s.batch_index) if s.batch_index >= 0 else -1)

        now = self._clock()
        out = self._held
        for s, token in zip(in_batch, sampled):
            if s.pending:
                fed = s.pending[: s.n_batch_tokens]
                s.kv.extend(fed)
                del s.pending[: s.n_batch_tokens]
                self._unreported_prompt += len(fed)
            else:
                s.kv.append(s.last_token)
            if s.batch_index < 0:
                continue
            if s.n_generated == 0:
                s.t_first = now
                self._observer.first_token(self.name, now - s.t_queued)
            s.n_generated += 1
            self._unreported_generated += 1
            self._on_token(s, token, out)  # may end the request, which reports the counts so far
        if now - self._reported_at >= _REPORT_EVERY_S:
            self._report(now)

    def _on_token(self, s: _Slot, token: int, out: list) -> None:
        req = s.req
        lp = self._logprob(s, token) if req.logprobs is not None else None
        finish: str | None = None
        piece, eog = self.model.token_info(token)
        if eog and not req.ignore_eos:
            finish = "stop"
        else:
            s.last_token = token
            s.text += s.decoder.decode(piece)
            if lp is not None:
                s.held_logprobs.append(lp)
            safe = len(s.text)
            if req.stop:
                cut, safe = _scan_stops(s.text, s.emitted, req.stop)
                if cut is not None:
                    s.text = s.text[:cut]
                    finish = "stop"
            if finish is None:
                # len(kv) + 1 tokens now exist (the one just sampled is not decoded yet): stop at the cap.
                if s.n_generated >= req.max_tokens or len(s.kv) + 1 >= s.limit:
                    finish = "length"
                    safe = len(s.text)
            if finish is None and safe > s.emitted:
                out.append((s.gen, Delta(s.text[s.emitted : safe], 1, tuple(s.held_logprobs) if s.held_logprobs else ())))
                s.emitted = safe
                if s.held_logprobs:
                    s.held_logprobs = []
        if finish is None:
            return
        if finish == "length":
            s.text += s.decoder.decode(b"", final=True)
        if len(s.text) > s.emitted or s.held_logprobs:
            out.append((s.gen, Delta(s.text[s.emitted :], 0, tuple(s.held_logprobs))))
        now = self._clock()
        prompt_n = len(req.prompt) - s.cached
        t_first = s.t_first or now
        out.append(
            (
                s.gen,
                Done(
                    finish,
                    Usage(len(req.prompt), s.n_generated, s.cached),
                    Timings(
                        prompt_n=prompt_n,
                        prompt_ms=(t_first - s.t_admitted) * 1000,
                        predicted_n=s.n_generated,
                        predicted_ms=(now - t_first) * 1000,
                        queued_ms=(s.t_admitted - s.t_queued) * 1000,
                    ),
                ),
            )
        )
        self._release(s)

    def _logprob(self, s: _Slot, token: int) -> TokenLogprob:
        logits = self._ctx.logits(s.batch_index).astype(np.float64)
        m = logits.max()
        lse = m + math.log(np.exp(logits - m).sum())
        k = s.req.logprobs or 0
        top: tuple = ()
        if k > 0:
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx])]
            top = tuple((self._tok_str(int(t)), tuple(self.model.piece(int(t))), float(logits[t] - lse)) for t in idx)
        return TokenLogprob(self._tok_str(token), tuple(self.model.piece(token)), float(logits[token] - lse), top)

    def _tok_str(self, token: int) -> str:
        return self.model.piece(token).decode("utf-8", "replace")


def _runs(seqs: set[int]) -> int:
    """How many runs of consecutive ids a set of sequence ids makes ({0, 1, 3} -> 2)."""
    return sum(1 for i in seqs if i - 1 not in seqs)


def _worth_taking(shared: int, n_cached: int, n_prompt: int) -> int:
    """A slot's shared prefix as a reason to take that slot: 0 when it is only a short shared head.

    The BOS token or a chat template's opening is common to unrelated prompts: taking a slot for
    that would throw away its cache (another client's conversation) for nothing.
    """
    return shared if shared >= _MIN_REUSE or (shared and shared in (n_cached, n_prompt)) else 0


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int32) != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


def _scan_stops(text: str, emitted: int, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(index where the first stop string starts, or None; how far the text is safe to emit).

    Text that could be the start of a stop string is held back until it can no longer match.
    """
    longest = max(len(x) for x in stops)
    start = max(0, emitted - longest + 1)
    cut = None
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and (cut is None or i < cut):
            cut = i
    if cut is not None:
        return cut, cut
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return None, max(emitted, len(text) - hold)
