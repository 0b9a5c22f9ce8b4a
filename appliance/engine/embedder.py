"""Embeddings and reranking: one thread per model that serves them, on its own pooled llama context.

The generation context never pools, so a model that serves embeddings gets a second context beside it
(`EmbeddingContext`: pooled, one unified KV stream cleared after every decode). Its thread packs the
inputs of every waiting request into as few `llama_decode` calls as fit (`n_tokens` tokens and
`n_seq` sequences each), reads each sequence's pooled vector and L2-normalizes it, as llama-server
does for /v1/embeddings. Requests come in through a C `SimpleQueue` (never monkey-patched) and
vectors go back through each job's libev async watcher, like the scheduler's `Generation`.

A reranker (pooling `rank`: a cross-encoder with a classification head) runs on the same machinery:
each input is a query-document pair laid out as llama-server lays it out (`rerank_inputs`), and its
"vector" is the head's raw output, whose first value is the pair's relevance score (not normalized).
"""

from __future__ import annotations

import enum
import logging
from _queue import SimpleQueue  # the C queue: never monkey-patched, safe between a greenlet and a thread
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import gevent
import numpy as np
from gevent.hub import Waiter

from appliance.engine.errors import (
    EngineCrashed,
    EngineError,
    InputTooLong,
    InvalidPrompt,
    LoadRefused,
    UnknownModel,
)
from appliance.engine.events import EngineObserver, NullObserver
from appliance.engine.llama import POOLING_TYPES, Batch, EmbeddingContext, LlamaModel, gguf_tensors_present
from appliance.engine.prompt import content_tokens
from appliance.osthreads import real_lock, start_thread

__all__ = ["ClientGone", "Embedder", "EmbeddingJob", "gguf_pooling", "MAX_SEQS", "l2_normalized", "classifier_head"]

log = logging.getLogger("appliance.engine")

MAX_SEQS = 64
"""The most inputs one decode pools (the embedding context's n_seq_max)."""


class _Stop(enum.Enum):
    STOP = enum.auto()


_STOP: Final = _Stop.STOP


def gguf_pooling(model: LlamaModel) -> str:
    """The pooling the model's GGUF declares (`<arch>.pooling_type`) when it is one that gives a vector
    per input (mean, cls, last) or a reranker's score (rank), else mean (generative models declare none)."""
    arch = model.meta("general.architecture")
    raw = model.meta(f"{arch}.pooling_type") if arch else None
    names = {str(v): k for k, v in POOLING_TYPES.items()}
    name = names.get((raw or "").strip())
    return name if name in ("mean", "cls", "last", "rank") else "mean"


def classifier_head(path: str | Path) -> frozenset[str]:
    """Which parts of a classification head a GGUF file holds: "cls" (`cls.weight`, the dense layer
    llama.cpp's rank pooling applies first) and "out" (`cls.output.weight`, the projection to the
    scores); empty for a file without one. llama.cpp has no call that says which tensors a model
    loaded, so the file's header is read with ggml's own GGUF reader (no tensor data)."""
    found = gguf_tensors_present(path, ("cls.weight", "cls.output.weight"))
    return frozenset(part for part, name in (("cls", "cls.weight"), ("out", "cls.output.weight")) if name in found)


def l2_normalized(v: np.ndarray) -> np.ndarray:
    """v / |v| (llama.cpp's common_embd_normalize with embd_norm = 2: the sum in double precision; a zero
    vector stays zero)."""
    norm = float(np.sqrt(np.dot(v.astype(np.float64), v.astype(np.float64))))
    out: np.ndarray = (v * np.float32(1.0 / norm if norm > 0 else 0.0)).astype(np.float32)
    return out


class ClientGone(Exception):
    """An embedding job's client closed its connection before the vectors were there."""


class EmbeddingJob:
    """The greenlet's side of one request's inputs: `wait()` for their vectors (L2-normalized, in order)."""

    def __init__(self, inputs: Sequence[Sequence[int]]) -> None:
        self.inputs = [list(i) for i in inputs]
        self.cancelled = False  # written by the greenlet, read by the embedder thread
        self._vectors: list[np.ndarray | None] = [None] * len(self.inputs)
        self._left = len(self.inputs)
        self._error: EngineError | None = None
        self._done = False
        self._waiter: Waiter | None = None
        self._watcher_lock = real_lock()
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.start(self._on_wake)

    @property
    def n_tokens(self) -> int:
        return sum(len(i) for i in self.inputs)

    def cancel(self) -> None:
        """Abandon the job (client gone): the embedder skips its inputs not yet decoded, and `wait()`
        returns at once, raising ClientGone. Any greenlet or thread."""
        self.cancelled = True
        self._wake()

    def wait(self) -> list[np.ndarray]:
        """Block this greenlet (never the event loop) until every vector is there; the engine's error if
        it failed; ClientGone once cancelled."""
        try:
            while True:
                if self.cancelled:  # (even where the vectors are there: nobody is left to read them)
                    raise ClientGone()
                if self._done:
                    break
                self._waiter = Waiter()
                self._waiter.get()
        finally:
            self._waiter = None
            if not self._done:
                self.cancelled = True
            self._close()
        if self._error is not None:
            raise self._error
        return [v for v in self._vectors if v is not None]

    def _on_wake(self) -> None:  # the hub
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.switch(None)

    # -- the embedder thread -----------------------------------------------------------------

    def _put(self, i: int, vector: np.ndarray) -> None:
        self._vectors[i] = vector
        self._left -= 1
        if self._left == 0:
            self._finish()

    def _fail(self, error: EngineError) -> None:
        if not self._done:
            self._error = error
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self._wake()

    def _wake(self) -> None:
        """Have the hub run _on_wake (from any thread), unless wait() has already closed the watcher."""
        with self._watcher_lock:
            if self._watcher is not None:
                self._watcher.send()

    def _close(self) -> None:
        with self._watcher_lock:
            if self._watcher is not None:
                self._watcher.close()
                self._watcher = None


class _RerankLayout:
    """How llama-server's format_prompt_rerank lays out a query and a document for a model: by the GGUF's
    rerank template (`tokenizer.chat_template.rerank`: `{query}` and `{document}` replaced, then tokenized
    without BOS, special tokens read), else BOS, query, EOS, SEP, document, EOS, each special token where
    the vocabulary says to add it (EOS falling back to SEP), the texts tokenized with no special tokens
    added or read."""

    def __init__(self, template: str | None, head: list[int], middle: list[int], tail: list[int]) -> None:
        self.template = template
        self.head, self.middle, self.tail = head, middle, tail

    @classmethod
    def of(cls, model: LlamaModel) -> _RerankLayout:
        import llama_cpp.llama_cpp as C

        raw = C.llama_model_chat_template(model.ptr, b"rerank")
        if raw is not None:
            return cls(raw.decode("utf-8", "replace"), [], [], [])
        v = model.vocab
        eos = C.llama_vocab_eos(v)
        sep = C.llama_vocab_sep(v)
        if eos == C.LLAMA_TOKEN_NULL:
            eos = sep
        add_eos = bool(C.llama_vocab_get_add_eos(v))
        head = [C.llama_vocab_bos(v)] if C.llama_vocab_get_add_bos(v) else []
        middle = ([eos] if add_eos else []) + ([sep] if C.llama_vocab_get_add_sep(v) else [])
        return cls(None, head, middle, [eos] if add_eos else [])

    def pair(self, model: LlamaModel, query: str, document: str) -> list[int]:
        if self.template is not None:
            text = self.template.replace("{query}", query).replace("{document}", document)
            return content_tokens(model, text, add_special=False, parse_special=True)
        q = content_tokens(model, query, add_special=False, parse_special=False)
        d = content_tokens(model, document, add_special=False, parse_special=False)
        return [*self.head, *q, *self.middle, *d, *self.tail]


class Embedder:
    """A model's embedding context on a dedicated OS thread; `submit` is called from greenlets."""

    def __init__(
        self,
        name: str,
        model: LlamaModel,
        *,
        n_tokens: int,
        n_threads: int,
        n_threads_batch: int,
        pooling: str,
        flash_attn: str = "auto",
        observer: EngineObserver | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self._observer = observer or NullObserver()
        self._inbox: SimpleQueue[EmbeddingJob | _Stop] = SimpleQueue()
        self._accepting = True
        self._refusal: EngineError | None = None
        self._exited = real_lock()
        self._exited.acquire()
        self._max_seqs = MAX_SEQS
        self._layout: _RerankLayout | None = None
        if pooling == "rank":
            head = classifier_head(model.path)
            if not head:
                raise LoadRefused("pooling rank needs a reranking model, with a classification head (cls.* tensors); "
                                  "this file has none")
            if "out" not in head:
                # llama.cpp reads sequence s's scores at s * n_cls_out floats of the head's output, whose rows
                # are n_embd wide without cls.output: right for the first sequence of a decode only.
                self._max_seqs = 1
            self._layout = _RerankLayout.of(model)
        # Created in the loading thread (a failure reaches the loader); from start() on only our thread uses it.
        # At most n_ctx_train tokens: a model with learned positions (BERT) has no row for a later one.
        self._ctx = EmbeddingContext(model, n_tokens=min(n_tokens, model.n_ctx_train), n_seq=MAX_SEQS,
                                     pooling=pooling, n_threads=n_threads, n_threads_batch=n_threads_batch,
                                     flash_attn=flash_attn)
        self.pooling = pooling
        self.n_tokens = self._ctx.n_tokens
        """The most tokens one input may have (and one decode holds)."""
        self.dimensions = self._ctx.n_out
        """The values per input: the vector's size, or a reranker's scores (one, mostly)."""
        self._batch = Batch(self.n_tokens)
        self._pending: deque[tuple[EmbeddingJob, int]] = deque()
        """Inputs taken from the inbox and not yet decoded (the thread's own), in arrival order."""
        self._decoding: list[tuple[EmbeddingJob, int]] = []
        model.retain()  # the weights outlive whichever of the two threads ends last
        self._started = False
        self._stopped = False

    @property
    def reranks(self) -> bool:
        """A reranker: each input a query-document pair, its output a relevance score."""
        return self._layout is not None

    def start(self) -> None:
        self._started = True
        start_thread(self._thread_main)

    def rerank_inputs(self, query: str, documents: Sequence[str]) -> list[list[int]]:
        """Each document's query-document pair as llama-server's /v1/rerank builds it (format_prompt_rerank),
        so a score here is llama-server's for the same model. Blocking: run it in the thread pool."""
        if self._layout is None:
            raise ValueError("not a reranker")
        return [self._layout.pair(self.model, query, d) for d in documents]

    def submit(self, inputs: Sequence[Sequence[int]]) -> EmbeddingJob:
        """Queue token sequences for their vectors (greenlet). InvalidPrompt for an empty input or an id
        outside the vocabulary, InputTooLong for one past `n_tokens`."""
        if not self._accepting:
            raise self._refusal or UnknownModel(self.name)
        n_vocab = self.model.n_vocab
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidPrompt(f"input {i} is empty (no tokens)")
            if len(tokens) > self.n_tokens:
                raise InputTooLong(index=i, length=len(tokens), limit=self.n_tokens)
            if any(not 0 <= t < n_vocab for t in tokens):
                raise InvalidPrompt(f"input {i}: token ids must be within the model's vocabulary (0 to {n_vocab - 1})")
        job = EmbeddingJob(inputs)
        self._inbox.put(job)
        return job

    def abort_all(self, error: EngineError) -> None:
        """Refuse new jobs with `error` and end the waiting ones with it (any thread; returns at once)."""
        self._refusal = error
        self._accepting = False
        self._inbox.put(_STOP)

    def stop(self, *, timeout: float = 30.0) -> bool:
        """Finish what is queued, then free the context (and the model, if the scheduler is done with it).
        Blocks the calling thread: from a greenlet, run it in the hub's thread pool."""
        self._accepting = False
        if self._stopped:
            return True
        if not self._started:
            self._stopped = True
            self._free()
            return True
        self._inbox.put(_STOP)
        if not self._exited.acquire(timeout=timeout):
            return False
        self._stopped = True
        return True

    # -- the embedder thread -----------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("embedder for model %s failed", self.name)
            self._refusal = EngineCrashed()
            self._accepting = False
            for job, _ in [*self._decoding, *self._pending]:
                job._fail(EngineCrashed())
            self._fail_queued(EngineCrashed())
        finally:
            self._accepting = False
            self._fail_queued(self._refusal or UnknownModel(self.name))  # a submit that raced the stop
            self._free()
            self._exited.release()

    def _free(self) -> None:
        self._ctx.close()
        self.model.close()

    def _fail_queued(self, error: EngineError) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except Exception:
                return
            if isinstance(item, EmbeddingJob):
                item._fail(error)

    def _loop(self) -> None:
        pending = self._pending
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                stopping |= self._take(self._inbox.get(), pending)
            while not self._inbox.empty():
                stopping |= self._take(self._inbox.get_nowait(), pending)
            if self._refusal is not None:  # abort_all: end everything now
                for job, _ in pending:
                    job._fail(self._refusal)
                self._fail_queued(self._refusal)
                return
            self._step(pending)

    def _take(self, item: EmbeddingJob | _Stop, pending: deque[tuple[EmbeddingJob, int]]) -> bool:
        if item is _STOP:
            return True
        if isinstance(item, EmbeddingJob):
            pending.extend((item, i) for i in range(len(item.inputs)))
        return False

    def _step(self, pending: deque[tuple[EmbeddingJob, int]]) -> None:
        """One decode: as many pending inputs, in order, as fit its tokens and sequences."""
        batch, room = self._batch, self.n_tokens
        batch.clear()
        taken: list[tuple[EmbeddingJob, int]] = []
        while pending and len(taken) < self._max_seqs:
            job, i = pending[0]
            if job.cancelled or job._error is not None:  # gone, or failed already: its other inputs are moot
                pending.popleft()
                continue
            tokens = job.inputs[i]
            if len(tokens) > room:
                break
            pending.popleft()
            batch.add(tokens, 0, len(taken), want_last_logits=True)
            batch.logits[batch.n - len(tokens) : batch.n] = 1  # a pooled context outputs every token
            taken.append((job, i))
            room -= len(tokens)
        if not taken:
            return
        self._decoding = taken
        rc = self._ctx.decode(batch)
        try:
            if rc != 0:
                log.error("embedding decode for model %s failed (llama_decode returned %d)", self.name, rc)
                for job, _ in taken:
                    job._fail(EngineCrashed())
                return
            self._observer.embedding_tokens(self.name, batch.n)  # before the answers: a scrape after one sees it
            for seq, (job, i) in enumerate(taken):
                vector = self._ctx.pooled(seq)
                if vector is None:
                    log.error("llama.cpp gave no pooled vector for model %s", self.name)
                    job._fail(EngineCrashed())
                    continue
                job._put(i, vector if self._layout is not None else l2_normalized(vector))
        finally:
            self._decoding = []
            self._ctx.clear()
