"""Continuous batching: one scheduler thread per loaded model owns its llama context.

Each step decodes one batch holding the next token of every generating sequence plus prompt chunks
of newly admitted requests; each sequence samples with its own sampler chain. Results go back to the
waiting greenlets through each generation's libev async watcher, whose `send()` is the
gevent-safe way in from another thread. Requests come in through a C-level SimpleQueue, which gevent
does not patch, so the scheduler thread blocks on it as a real thread.
"""

from __future__ import annotations

import codecs
import dataclasses
import enum
import logging
import math
import time
from _queue import SimpleQueue  # the C queue: never monkey-patched, safe between a greenlet and a thread
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import numpy as np

from appliance.engine.draft import Prediction, StepCosts, draft_length, expected_tokens
from appliance.engine.errors import (
    Busy,
    EngineCrashed,
    EngineError,
    InvalidLogitBias,
    NoAllowedToken,
    PromptTooLong,
    QueueFull,
    TooManyChoices,
    UnknownModel,
)
from appliance.engine.events import (
    Delta,
    Done,
    EngineObserver,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    NullObserver,
    PredictionUsage,
    Timings,
    TokenLogprob,
    Usage,
)
from appliance.engine.kvcache import HostCache
from appliance.engine.llama import NO_TOKEN, Batch, LlamaContext, LlamaModel, SamplerChain, SamplingParams
from appliance.engine.mailbox import Generation
from appliance.engine.slots import (
    MIN_REUSE,
    ActiveSlot,
    PairCost,
    Slot,
    common_prefix,
    runs,
    scan_stops,
    worth_taking,
)
from appliance.osthreads import real_lock, start_thread

__all__ = ["ModelEngine", "check_logit_bias"]

log = logging.getLogger("appliance.engine")


class _Stop(enum.Enum):
    STOP = enum.auto()


_STOP: Final = _Stop.STOP  # the inbox item that stops the scheduler


@dataclass(frozen=True)
class _Abort:
    """The inbox item that ends every admitted and queued request with `error` (shutdown's deadline)."""

    error: EngineError
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
        cache_ram_bytes: int = 0,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.name = name
        self.model = model
        self.parallel = parallel
        self.max_queue = max_queue
        self.n_threads = n_threads
        self.n_threads_batch = n_threads_batch
        self._observer = observer or NullObserver()
        self._clock = clock
        self._inbox: SimpleQueue[tuple[Generation, float] | _Stop | _Abort] = SimpleQueue()
        self._lock = real_lock()
        self._waiting = 0
        self._busy = 0
        self._accepting = True
        self._refusal: EngineError | None = None  # what submit() raises once abort_all() was called
        self._healthy = True
        self._exited = real_lock()
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
        self.n_batch = self._ctx.n_batch
        self._batch = Batch(self._ctx.n_batch)
        self._slots = [Slot(seq=i) for i in range(parallel)]
        self._active: list[ActiveSlot] = []
        """Slots serving a request, in slot order (the only ones a step has to look at)."""
        self._pairs = PairCost()
        self._costs = StepCosts()
        """Decode wall time by a step's token count: what a draft costs (Predicted Outputs)."""
        self._predicting = 0
        """Active slots whose request carries a prediction."""
        self.host_cache = HostCache(cache_ram_bytes) if cache_ram_bytes > 0 else None
        """Slots' KV copied out before their cells were dropped (kvcache.py); None when disabled."""
        self._copying: set[int] = set()
        """Sequences a seq_cp writes into at the next decode: their buffers are stale until then, so
        neither copied out nor restored into."""
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

    def host_cache_status(self) -> dict[str, int] | None:
        c = self.host_cache
        if c is None:
            return None
        return {"entries": len(c), "bytes": c.used, "budget_bytes": c.budget, "saved": c.saved,
                "restored": c.restored, "evicted": c.evicted}

    def start(self) -> None:
        start_thread(self._thread_main)

    def submit(self, request: GenerationRequest) -> Generation:
        if not self._accepting:
            raise self._refusal or UnknownModel(self.name)
        limit = min(self.n_ctx, request.n_ctx or self.n_ctx)
        if len(request.prompt) >= limit:
            raise PromptTooLong(limit=limit, length=len(request.prompt), request_limit=limit < self.n_ctx)
        check_logit_bias(request.sampling.logit_bias, self.model.n_vocab)
        if not 1 <= request.n <= self.parallel:  # admitted only with n free slots: more would wait forever
            raise TooManyChoices(request.n, self.parallel)
        with self._lock:
            if self._waiting >= self.max_queue + max(0, self.parallel - self._busy):
                raise QueueFull(self.name, self._waiting)
            self._waiting += 1
        gen = Generation(request)
        self._inbox.put((gen, self._clock()))
        return gen

    def abort_all(self, error: EngineError) -> None:
        """End every request admitted or waiting with `error` (each gets a Failed event: a stream its
        error event), and refuse new ones. Any thread; returns at once."""
        self._refusal = error
        self._accepting = False
        self._inbox.put(_Abort(error))

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
            self._fail_all(EngineCrashed())
        finally:
            for s in self._slots:
                if s.sampler:
                    s.sampler.close()
            if self.host_cache is not None:
                self.host_cache.clear()
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

    def _take(self, item: tuple[Generation, float] | _Stop | _Abort) -> bool:
        if item is _STOP:
            return True
        if isinstance(item, _Abort):
            self._fail_admitted(item.error)
            return False
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

    def _fail_admitted(self, error: EngineError) -> None:
        """Fail the running and queued requests (not what is still in the inbox)."""
        out, self._held = self._held, []
        failed: set[int] = set()
        for s in self._slots:
            if s.gen is not None:
                if id(s.gen) not in failed:  # once per request, whatever its choices
                    failed.add(id(s.gen))
                    out.append((s.gen, Failed(error)))
                self._release(s)
        while self._queue:
            gen, _ = self._queue.popleft()
            self._dec_waiting()
            out.append((gen, Failed(error)))
        self._deliver(out)

    def _fail_all(self, error: EngineError) -> None:
        self._fail_admitted(error)
        out: list[tuple[Generation, Event]] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except Exception:
                break
            if isinstance(item, tuple):
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

    def _release(self, s: Slot) -> None:
        self._report(self._clock())
        if s.sampler:
            s.sampler.close()
        if s.gen is not None:
            self._active.remove(cast(ActiveSlot, s))
        s.sampler = None
        s.gen = None
        s.req = None
        s.pending = []
        s.leader = None
        s.followers = []
        s.batch_index = -1  # a choice released mid-step (a sibling failed) takes no more of the step
        if s.prediction is not None:
            s.prediction = None
            self._predicting -= 1
        s.last_used = self._clock()
        with self._lock:
            self._busy -= 1

    def _fail(self, s: ActiveSlot, error: EngineError, out: list[tuple[Generation, Event]]) -> None:
        """End a slot's request with `error`: every one of its choices, as they share the mailbox."""
        out.append((s.gen, Failed(error)))
        for other in [a for a in self._active if a.gen is s.gen]:
            self._release(other)

    def _reap_cancelled(self) -> None:
        for s in [s for s in self._active if s.gen.cancelled]:
            self._release(s)
        if self._queue and any(gen.cancelled for gen, _ in self._queue):  # gone before a slot freed: stop counting them
            kept = deque(item for item in self._queue if not item[0].cancelled)
            for _ in range(len(self._queue) - len(kept)):
                self._dec_waiting()
            self._queue = kept

    def _admit(self, out: list[tuple[Generation, Event]]) -> None:
        while self._queue:
            free = [s for s in self._slots if s.gen is None]
            if not free:
                return
            gen, t_queued = self._queue[0]
            if gen.cancelled:
                self._queue.popleft()
                self._dec_waiting()
                continue
            req = gen.request
            if len(free) < req.n:  # all of a request's choices together or none; the queue waits
                return
            self._queue.popleft()
            prompt = list(req.prompt)
            # Which slot: llama.cpp decodes a split KV cache's sequences together only while their ids
            # are consecutive (each gap costs another pass over all the weights), so prefer the free
            # slot that keeps the busy ones contiguous; among those, prefix reuse (the free slot whose
            # cached tokens share the longest prefix with this prompt: the next turn of a chat, a common
            # system prompt), then the least recently used. A much longer cached prefix elsewhere still
            # wins: _compact() then copies it into place, which is cheaper than recomputing it.
            busy = {a.seq for a in self._active}
            shared = {a.seq: common_prefix(a.kv, prompt) for a in free}
            worth = {a.seq: worth_taking(shared[a.seq], len(a.kv), len(prompt)) for a in free}
            contiguous = min(free, key=lambda a: (runs(busy | {a.seq}), -worth[a.seq], a.last_used))
            reuse = min(free, key=lambda a: (-worth[a.seq], a.last_used))
            s = reuse if worth[reuse.seq] >= worth[contiguous.seq] + MIN_REUSE else contiguous
            # Cells kept in host memory beat every slot by a clear margin: copy them into the
            # contiguous slot (whose own cells are copied out first, if worth keeping).
            if self.host_cache is not None and len(self.host_cache) and contiguous.seq not in self._copying:
                entry, n = self.host_cache.best(prompt)
                n = worth_taking(n, len(entry.tokens), len(prompt)) if entry is not None else 0
                if entry is not None and n >= worth[s.seq] + MIN_REUSE:
                    s = contiguous
                    self._save(s)
                    if self._ctx.set_seq_state(s.seq, entry.state):
                        s.kv, shared[s.seq] = entry.tokens.tolist(), n
                    else:  # (the slot is left empty)
                        log.warning("model %s: KV kept in host memory could not be restored", self.name)
                        s.kv, shared[s.seq] = [], 0
                    self.host_cache.take(entry)
            # Whatever the slot, what it shares is reused (a BOS token is a prompt token less to decode).
            keep = min(shared[s.seq], len(prompt) - 1)  # at least one token must be decoded for logits
            if keep < len(s.kv):
                if len(s.kv) - keep >= MIN_REUSE:  # another conversation's cells: keep them in host memory
                    self._save(s)
                if not self._ctx.seq_rm(s.seq, keep, -1):
                    self._ctx.seq_rm(s.seq, -1, -1)
                    keep = 0
                del s.kv[keep:]
            # The other choices' slots: those keeping the busy ids fewest runs (their cache is replaced
            # by a copy of this one's prompt).
            group = [s]
            for _ in range(req.n - 1):
                taken = busy | {g.seq for g in group}
                rest = [a for a in free if a not in group]
                group.append(min(rest, key=lambda a: (runs(taken | {a.seq}), a.last_used)))
                self._save(group[-1])  # its cells are replaced by a copy of the prompt's
            try:
                samplers = [
                    SamplerChain(self.model, req.sampling if i == 0 else _choice_sampling(req, i))
                    for i in range(req.n)
                ]
            except Exception:
                log.exception("sampler setup failed")
                self._dec_waiting()
                out.append((gen, Failed(EngineCrashed())))
                continue
            with self._lock:  # one step, so submit() never sees the request in neither count
                self._waiting -= 1
                self._busy += req.n
            now = self._clock()
            for i, (slot, sampler) in enumerate(zip(group, samplers)):
                slot.gen, slot.req, slot.sampler = gen, req, sampler
                self._active.append(cast(ActiveSlot, slot))  # its decoder is set below, before the next step
                slot.index = i
                slot.leader = s if i else None
                slot.followers = group[1:] if i == 0 else []
                slot.pending = prompt[keep:] if i == 0 else []
                slot.cached = keep
                slot.limit = min(self.n_ctx, req.n_ctx or self.n_ctx)
                slot.n_generated = 0
                slot.last_token = -1
                slot.text, slot.emitted, slot.held_logprobs = "", 0, []
                slot.decoder = codecs.getincrementaldecoder("utf-8")("replace")
                slot.prediction = Prediction(req.prediction) if req.prediction and i == 0 else None
                slot.draft = []
                if slot.prediction is not None:
                    self._predicting += 1
                slot.t_queued, slot.t_admitted, slot.t_first = t_queued, now, 0.0
            self._active.sort(key=lambda a: a.seq)

    def _save(self, s: Slot) -> None:
        """Copy slot `s`'s cells into the host cache before they are dropped, when worth keeping."""
        cache = self.host_cache
        if cache is None or len(s.kv) < MIN_REUSE or s.seq in self._copying or cache.holds(s.kv):
            return
        state = self._ctx.seq_state(s.seq)
        if state is not None:
            cache.put(s.kv, state)

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
            self._save(free)
            self._ctx.seq_cp(mover.seq, hole)
            self._copying.add(hole)
            mover.seq, free.seq = hole, mover.seq
            self._slots[mover.seq], self._slots[free.seq] = mover, free
            free.kv = list(mover.kv)
            free.last_used = self._clock()
        self._active.sort(key=lambda a: a.seq)

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        in_batch: list[ActiveSlot] = []
        prefilling: list[ActiveSlot] = []
        hinted = False
        # Generating sequences first: one token each, so streams never stall behind a long prompt.
        for s in self._active:
            if s.pending:
                prefilling.append(s)
            elif s.leader is None:  # (else it waits for the prompt another choice decodes)
                s.batch_index = batch.add_one(s.last_token, len(s.kv), s.seq)
                s.n_batch_tokens = 1
                in_batch.append(s)
            hinted = hinted or bool(s.req.n_threads)
        if self._predicting:
            self._add_drafts(in_batch, prefilling)
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
            and batch.n == 2
            and len(in_batch) == 2
            and in_batch[0].req.logprobs is None
            and in_batch[1].req.logprobs is None
            and self._pairs.split()
        ):
            passes = [in_batch[:1], in_batch[1:]]
        sampled: list[int] = []
        for group in passes:
            if len(passes) > 1:
                batch.clear()
                s = group[0]
                s.batch_index = batch.add_one(s.last_token, len(s.kv), s.seq)
            if self._held:
                self._hand_over()
            t0 = self._clock()
            rc = self._ctx.decode(batch)
            if rc != 0:
                log.error("llama_decode returned %d for model %s", rc, self.name)
                err: EngineError = Busy("No room in the model's cache; try again") if rc == 1 else EngineCrashed()
                for s in in_batch:
                    self._ctx.seq_rm(s.seq, -1, -1)
                    s.kv.clear()
                    s.draft = []
                    if s.gen is not None:  # (not a choice whose sibling's failure already ended it)
                        self._fail(s, err, self._held)
                return
            if self._copying:  # (that decode applied them)
                self._copying.clear()
            if not prefilling:  # (a step with a prompt chunk is split by llama.cpp into unequal parts)
                took = self._clock() - t0
                self._costs.observe(batch.n, took)
                if batch.n <= 2:
                    self._pairs.observe(batch.n, took)
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
            followers: list[Slot] = []
            if s.n_generated == 0:
                s.t_first = now
                self._observer.first_token(self.name, now - s.t_queued)
                followers = s.followers
            s.n_generated += 1
            self._unreported_generated += 1
            gen, idx = s.gen, s.batch_index
            if s.prediction is not None:
                s.prediction.observe(token)
            self._on_token(s, token, out)  # may end the request, which reports the counts so far
            if s.draft:
                self._verify(s, token, gen, out)
            if followers:
                self._fork(s.seq, s.kv, gen, idx, cast("list[ActiveSlot]", followers), now, out)
        if now - self._reported_at >= _REPORT_EVERY_S:
            self._report(now)

    def _add_drafts(self, in_batch: list[ActiveSlot], prefilling: list[ActiveSlot]) -> None:
        """Append predicted tokens after the generating sequences' own, where the costs measured so far
        say they pay (engine/draft.py)."""
        batch = self._batch
        base_tokens = batch.n + min(sum(len(p.pending) for p in prefilling), batch.capacity - batch.n)
        base_yield = float(batch.n)
        for s in in_batch:
            p = s.prediction
            if p is None:
                continue
            # Every drafted token kept, and the one sampled after them, must fit the request's
            # max_tokens, its context, and the batch.
            room = min(s.req.max_tokens - s.n_generated - 1, s.limit - len(s.kv) - 2, batch.capacity - batch.n - 1)
            k = draft_length(p, self._costs, base_tokens, base_yield, room)
            if k:
                s.draft = p.upcoming(k)
                s.draft_index = batch.n
                batch.add(s.draft, len(s.kv) + 1, s.seq, True, all_logits=True)
                p.drafted += k
                base_tokens += k
                base_yield += expected_tokens(p.acceptance, k) - 1

    def _verify(self, s: ActiveSlot, token: int, gen: Generation, out: list[tuple[Generation, Event]]) -> None:
        """Slot `s` decoded drafted tokens after its own, and sampled `token` after its own: while the
        sampled token is the one drafted at that place, the draft's KV there is the answer's, so keep it
        and sample the next token from the logits after it, exactly as a step of its own would. The
        first token that differs is emitted as sampled; the cells decoded after it are removed."""
        draft, base, p = s.draft, s.draft_index, s.prediction
        s.draft = []
        kept = 0
        while kept < len(draft) and s.gen is gen and token == draft[kept]:
            s.kv.append(token)
            s.batch_index = base + kept
            kept += 1
            if p is not None:
                p.draft_kept += 1
            token = s.sampler.sample(self._ctx, s.batch_index)
            s.n_generated += 1
            self._unreported_generated += 1
            if p is not None:
                p.observe(token)
            self._on_token(s, token, out)
        if kept < len(draft):
            self._ctx.seq_rm(s.seq, len(s.kv), -1)

    def _fork(
        self, seq: int, kv: list[int], gen: Generation, idx: int, followers: list[ActiveSlot], now: float,
        out: list[tuple[Generation, Event]],
    ) -> None:
        """The first choice's prompt (sequence `seq`, tokens `kv`, logits at batch row `idx`) is decoded:
        copy its KV to the other choices' slots (applied by the next decode) and let each sample its
        first token from the same logits with its own sampler. The first choice may have ended already
        (its slot keeps the prompt's KV until the next admission, after that decode)."""
        for f in followers:
            if f.gen is not gen:  # released meanwhile: its request failed
                continue
            self._ctx.seq_cp(seq, f.seq)
            self._copying.add(f.seq)
            f.kv = list(kv)
            f.leader = None
            f.batch_index = idx
            f.t_first = now
            f.n_generated = 1
            self._unreported_generated += 1
            self._on_token(f, f.sampler.sample(self._ctx, idx), out)

    def _on_token(self, s: ActiveSlot, token: int, out: list[tuple[Generation, Event]]) -> None:
        req = s.req
        if token == NO_TOKEN:  # its grammar allows nothing this vocabulary can spell
            self._fail(s, NoAllowedToken(), out)
            return
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
                cut, safe = scan_stops(s.text, s.emitted, req.stop)
                if cut is not None:
                    s.text = s.text[:cut]
                    finish = "stop"
            if finish is None:
                # len(kv) + 1 tokens now exist (the one just sampled is not decoded yet): stop at the cap.
                if s.n_generated >= req.max_tokens or len(s.kv) + 1 >= s.limit:
                    finish = "length"
                    safe = len(s.text)
            if finish is None and safe > s.emitted:
                out.append((s.gen, Delta(s.text[s.emitted : safe], 1, tuple(s.held_logprobs) if s.held_logprobs else (), s.index)))
                s.emitted = safe
                if s.held_logprobs:
                    s.held_logprobs = []
        if finish is None:
            return
        if finish == "length":
            s.text += s.decoder.decode(b"", final=True)
        if len(s.text) > s.emitted or s.held_logprobs:
            out.append((s.gen, Delta(s.text[s.emitted :], 0, tuple(s.held_logprobs), s.index)))
        now = self._clock()
        prompt_n = len(req.prompt) - s.cached
        t_first = s.t_first or now
        if s.index == 0:  # once per request: the other choices share its prompt and its queueing
            self._observer.request_finished(self.name, Finished(
                queued=s.t_admitted - s.t_queued,
                e2e=now - s.t_queued,
                itl=(now - t_first) / (s.n_generated - 1) if s.n_generated > 1 else None,
                prompt=len(req.prompt),
                cached=s.cached,
            ))
        out.append(
            (
                s.gen,
                Done(
                    finish,
                    Usage(len(req.prompt), s.n_generated, s.cached, None if s.prediction is None else PredictionUsage(
                        s.prediction.matched, s.prediction.rejected(), s.prediction.drafted, s.prediction.draft_kept)),
                    Timings(
                        prompt_n=prompt_n,
                        prompt_ms=(t_first - s.t_admitted) * 1000,
                        predicted_n=s.n_generated,
                        predicted_ms=(now - t_first) * 1000,
                        queued_ms=(s.t_admitted - s.t_queued) * 1000,
                    ),
                    s.index,
                ),
            )
        )
        self._release(s)

    def _logprob(self, s: ActiveSlot, token: int) -> TokenLogprob:
        logits = self._ctx.logits(s.batch_index).astype(np.float64)
        m = logits.max()
        lse = m + math.log(np.exp(logits - m).sum())
        k = s.req.logprobs or 0
        top: tuple[tuple[str, tuple[int, ...], float], ...] = ()
        if k > 0:
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx])]
            top = tuple((self._tok_str(int(t)), tuple(self.model.piece(int(t))), float(logits[t] - lse)) for t in idx)
        return TokenLogprob(self._tok_str(token), tuple(self.model.piece(token)), float(logits[token] - lse), top)

    def _tok_str(self, token: int) -> str:
        return self.model.piece(token).decode("utf-8", "replace")


def _choice_sampling(req: GenerationRequest, i: int) -> SamplingParams:
    """Choice i's sampling: the request's, with seed + i (so a seeded request stays reproducible)."""
    return dataclasses.replace(req.sampling, seed=(req.sampling.seed + i) & 0xFFFFFFFF)


def check_logit_bias(bias: tuple[tuple[int, float], ...], n_vocab: int) -> None:
    """InvalidLogitBias unless every biased token id is in the vocabulary."""
    for token, _ in bias:
        if not 0 <= token < n_vocab:
            raise InvalidLogitBias(f"token id {token} is not in this model's vocabulary (ids 0 to {n_vocab - 1})")
