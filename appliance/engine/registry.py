"""The loaded models: load and unload off the event loop, digests, state for /status and /readiness.

The registry's table is only changed on the event loop (greenlets); the slow parts (hashing,
llama.cpp loading, freeing) run in the hub's thread pool, so other models keep serving meanwhile.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.digests import file_sha256
from appliance.engine.chat import ChatTemplate, model_chat_template
from appliance.engine.cpuprobe import BackendChoice
from appliance.engine.embedder import Embedder, classifier_head, gguf_pooling
from appliance.engine.errors import (
    Conflict,
    EmbeddingsDisabled,
    EngineError,
    InvalidPrompt,
    LoadRefused,
    ModelNotReady,
    UnknownModel,
)
from appliance.engine.events import EngineObserver
from appliance.engine.grammar import build_grammar
from appliance.engine.llama import (
    BackendConfig,
    Grammar,
    LlamaModel,
    backend_devices,
    backend_ready,
    cpu_backend_choice,
)
from appliance.engine.memory import check_fits, kv_estimate, trim_heap
from appliance.engine.modelfile import SealedModel, check_gguf, read_sealed, shmem_huge_pages
from appliance.engine.prompt import (
    Message,
    chat_tokens,
    content_tokens,
    infill_tokens,
    text_tokens,
    token_ids,
    token_pieces,
)
from appliance.engine.scheduler import ModelEngine
from appliance.osthreads import off_loop
from appliance.settings import ModelSettings, default_threads

__all__ = ["ModelRecord", "ModelRegistry"]

log = logging.getLogger("appliance.models")
_SEALED_OPENABLE = Path("/proc/self/fd")

@dataclass
class ModelRecord:
    name: str
    settings: ModelSettings
    state: str = "loading"  # loading | ready | failed | unloading
    sha256: str | None = None
    size_bytes: int | None = None
    n_params: int | None = None
    n_ctx: int | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    chat_template: ChatTemplate | None = None  # None: chat requests get a 400 naming the setting
    error: str | None = None
    engine: ModelEngine | None = None
    embedder: Embedder | None = None  # only where the model's settings ask for embeddings, or it is a reranker
    mmap: bool = False  # the weights are mapped from the file on disk (vouched for), not read into memory

    def status(self) -> dict[str, Any]:
        e = self.engine
        return {
            "name": self.name,
            "path": str(self.settings.path),
            "sha256": self.sha256,
            "size": self.size_bytes,
            "n_params": self.n_params,
            "n_ctx": self.n_ctx,
            "slots": self.settings.parallel,
            "busy_slots": e.busy_slots if e else 0,
            "queue_depth": e.queue_depth if e else 0,
            "state": self.state,
            "loaded_at": self.loaded_at,
            "load_seconds": self.load_seconds,
            "error": self.error,
            "chat_template": self.chat_template.status() if self.chat_template else None,
            "mmap": self.mmap,
            "kv_host_cache": e.host_cache_status() if e else None,
            "embeddings": {"pooling": self.embedder.pooling, "dimensions": self.embedder.dimensions,
                           "max_input_tokens": self.embedder.n_tokens} if self.embedder else None,
        }


class ModelRegistry:
    def __init__(
        self,
        *,
        observer: EngineObserver | None = None,
        wall_clock: Callable[[], float] = time.time,
        engine_factory: Callable[[ModelSettings, EngineObserver | None, Path], ModelEngine] | None = None,
        allowed_sha256: frozenset[str] = frozenset(),
        default_mmap: bool = False,
        after_read: Callable[[Path], None] | None = None,
        backend: BackendConfig | None = None,
        embedder_factory: Callable[[ModelSettings, LlamaModel, EngineObserver | None], Embedder] | None = None,
    ) -> None:
        """`default_mmap`: map model files from disk unless a model's use_mmap says otherwise (only
        where no TEE provider is active). `after_read`: a test hook run between reading a model's
        bytes and loading them. `backend`: which CPU build of llama.cpp to load at the first model."""
        self._default_mmap = default_mmap
        self._after_read = after_read
        self._huge_pages_said = False
        self._allowed = allowed_sha256
        self._on_loaded: Callable[[str, str], None] | None = None  # on_loaded()
        self._records: dict[str, ModelRecord] = {}
        self._observer = observer
        self._wall_clock = wall_clock
        self._engine_factory = engine_factory or functools.partial(_build_engine, backend=backend)
        self._embedder_factory = embedder_factory or _build_embedder

    # -- queries (event loop) ----------------------------------------------------------------

    def on_loaded(self, fn: Callable[[str, str], None]) -> None:
        """Call fn(name, sha256) in the loading thread once a model's digest is known, before it serves
        (the runtime measurement)."""
        self._on_loaded = fn

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def get(self, name: str) -> ModelEngine:
        rec = self._records.get(name)
        if rec is None or rec.state in ("failed", "unloading"):
            raise UnknownModel(name)
        if rec.state != "ready":
            raise ModelNotReady(name, rec.state)
        if rec.engine is None:  # never: the engine is set before the state becomes "ready"
            raise UnknownModel(name)
        return rec.engine

    def text_prompt(self, name: str, prompt: str | Sequence[int]) -> tuple[ModelEngine, list[int]]:
        """The model's engine and a completion's prompt tokens (tokenized off the event loop)."""
        engine = self.get(name)
        if isinstance(prompt, str):
            return engine, off_loop(text_tokens, engine.model, prompt)
        return engine, token_ids(engine.model, prompt)

    def infill_prompt(
        self, name: str, prefix: str | Sequence[int], suffix: str, *, n_predict: int
    ) -> tuple[ModelEngine, list[int]]:
        """The model's engine and a fill-in-the-middle prompt (tokenized off the event loop);
        InfillNotSupported for a model without FIM tokens."""
        engine = self.get(name)
        return engine, off_loop(
            infill_tokens, engine.model, prefix, suffix, n_batch=engine.n_batch, n_predict=n_predict, n_ctx=engine.n_ctx
        )

    def chat_prompt(self, name: str, messages: list[Message]) -> tuple[ModelEngine, list[int]]:
        """The model's engine and a chat's prompt tokens: its template rendered and tokenized off the
        event loop (a built-in template is a llama.cpp call too)."""
        engine = self.get(name)
        template = self._records[name].chat_template
        return engine, off_loop(chat_tokens, engine.model, template, messages, model_name=name)

    def tokenize(self, name: str, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Text as the model's tokens, no chat template (tokenized off the event loop)."""
        engine = self.get(name)
        return off_loop(content_tokens, engine.model, text, add_special=add_special, parse_special=parse_special)

    def pieces(self, name: str, ids: Sequence[int]) -> list[bytes]:
        """Each token's bytes, control tokens spelt out (off the event loop); InvalidPrompt for an id
        outside the vocabulary."""
        engine = self.get(name)
        return off_loop(token_pieces, engine.model, ids)

    def grammar(self, name: str, *, gbnf: str | None = None, schema: object = None) -> Grammar:
        """A grammar for the model's vocabulary from GBNF text or a JSON schema, checked and compiled
        off the event loop; InvalidGrammar saying what is wrong with it."""
        engine = self.get(name)
        return off_loop(build_grammar, engine.model, gbnf=gbnf, schema=schema)

    def embedder(self, name: str) -> Embedder:
        """The model's embedding engine (a reranker's too); EmbeddingsDisabled where it has none."""
        self.get(name)
        embedder = self._records[name].embedder
        if embedder is None:
            raise EmbeddingsDisabled(name)
        return embedder

    def embedding_inputs(self, name: str, inputs: Sequence[str] | Sequence[Sequence[int]]) -> tuple[Embedder, list[list[int]]]:
        """The model's embedding engine and each input's tokens: text tokenized as llama-server does for
        /v1/embeddings (BOS where the model adds one, special tokens parsed), off the event loop; token
        ids as they are, checked against the vocabulary."""
        embedder = self.embedder(name)
        if embedder.reranks:  # its output is a score, not a vector
            raise EmbeddingsDisabled(name, reranker=True)
        model = embedder.model
        texts = [i for i in inputs if isinstance(i, str)]
        if texts:
            if len(texts) != len(inputs):
                raise InvalidPrompt("inputs must be all strings or all token id lists")
            return embedder, off_loop(lambda: [text_tokens(model, t) for t in texts])
        return embedder, [token_ids(model, i) for i in inputs if not isinstance(i, str)]

    def record(self, name: str) -> ModelRecord:
        rec = self._records.get(name)
        if rec is None:
            raise UnknownModel(name)
        return rec

    def devices(self) -> list[dict[str, Any]]:
        """The compute devices llama.cpp uses (after the first load), with the backend module of each."""
        return backend_devices() if backend_ready() else []

    def cpu_backend(self) -> BackendChoice | None:
        """The CPU build llama.cpp runs (after a probe, perhaps a fallback), once one is loaded."""
        return cpu_backend_choice()

    def ready(self) -> bool:
        ready = [r for r in self._records.values() if r.state == "ready"]
        return bool(ready) and all(r.engine is not None and r.engine.healthy for r in ready)

    # -- changes (event loop; blocking work goes to the thread pool) ----------------------------

    def load(self, settings: ModelSettings) -> ModelRecord:
        """Load a model: blocks the calling greenlet, never the event loop."""
        existing = self._records.get(settings.name)
        if existing is not None and existing.state != "failed":
            raise Conflict(f"A model named '{settings.name}' is already {existing.state}")
        check_gguf(settings.path)
        mmap = self._mmap_for_load(settings)
        rec = ModelRecord(settings.name, settings, mmap=mmap)
        self._records[settings.name] = rec
        t0 = time.perf_counter()
        try:
            engine, embedder, sha, template = off_loop(self._load_blocking, settings, mmap)
        except LoadRefused as e:
            rec.state = "failed"
            rec.error = "digest not in model_policy.allowed_sha256" if e.forbidden else e.message
            log.warning("model %s refused: %s", settings.name, rec.error)
            raise
        except Exception as e:
            rec.state = "failed"
            rec.error = "llama.cpp could not load the file" if isinstance(e, ValueError) else "load failed"
            log.warning("model %s failed to load: %s", settings.name, type(e).__name__)
            raise LoadRefused(rec.error) from None
        rec.engine = engine
        rec.embedder = embedder
        rec.sha256 = sha
        rec.chat_template = template
        rec.size_bytes = settings.path.stat().st_size
        rec.n_params = engine.model.n_params
        rec.n_ctx = engine.n_ctx
        rec.load_seconds = round(time.perf_counter() - t0, 3)
        rec.loaded_at = self._wall_clock()
        if rec.state == "loading":  # not unloaded meanwhile
            rec.state = "ready"
            engine.start()
            if embedder is not None:
                embedder.start()
                if embedder.reranks:
                    log.info("model %s serves reranking (at most %d tokens per query-document pair)",
                             settings.name, embedder.n_tokens)
                else:
                    log.info("model %s serves embeddings (%s pooling, %d dimensions, at most %d tokens per input)",
                             settings.name, embedder.pooling, embedder.dimensions, embedder.n_tokens)
            log.info("model %s ready in %.2fs (sha256 %s)", settings.name, rec.load_seconds, sha[:16])
            if template is not None:
                log.info("model %s chat template: %s", settings.name, template.describe())
            else:
                log.warning(
                    "model %s has no chat template and no llama.cpp built-in one fits it: chat requests get 400 "
                    "until its chat_template setting names one",
                    settings.name,
                )
        return rec

    def mmap_of(self, settings: ModelSettings) -> bool:
        """Whether llama.cpp maps this model's file from disk (the operator vouches for the disk), or
        loads the one copy read into sealed memory (the default wherever a TEE provider is active)."""
        return self._default_mmap if settings.use_mmap is None else settings.use_mmap

    def _mmap_for_load(self, settings: ModelSettings) -> bool:
        """mmap_of(settings), unless the sealed copy cannot be opened here: llama.cpp opens it as
        /proc/self/fd/N, and a chroot or a minimal container may have no /proc. Then a model whose
        use_mmap is unset is mapped from its file (as the claims then say, so a verifier's default
        policy refuses it), and one whose use_mmap is false is refused."""
        mmap = self.mmap_of(settings)
        if mmap or _SEALED_OPENABLE.is_dir():
            return mmap
        if settings.use_mmap is False:
            raise LoadRefused(
                f"model {settings.name}: use_mmap = false needs /proc (its sealed copy is opened as "
                "/proc/self/fd/N), and /proc is not mounted here", subject="use_mmap")
        log.warning("model %s: /proc is not mounted, so its file is mapped from disk instead of read into sealed "
                    "memory (the claims say mmap: true)", settings.name)
        return True

    def _say_once_about_huge_pages(self) -> None:
        if self._huge_pages_said:
            return
        self._huge_pages_said = True
        mode = shmem_huge_pages()
        if mode in ("never", "deny"):
            log.warning(
                "sealed model copies are in 4 KiB pages (transparent_hugepage/shmem_enabled = %s): weights "
                "llama.cpp maps rather than repacks decode up to ~8%% slower (measured on a Q8_0 model); set "
                "it to within_size in this machine's kernel (README, Trust)", mode)

    def _load_blocking(
        self, settings: ModelSettings, mmap: bool
    ) -> tuple[ModelEngine, Embedder | None, str, ChatTemplate | None]:
        sealed: SealedModel | None = None
        if mmap:
            # The disk is trusted by configuration: hashed, then mapped (what the claims then say).
            sha, source = file_sha256(settings.path), settings.path
            if self._after_read is not None:
                self._after_read(settings.path)  # the window between hashing and mapping, for tests
        else:
            # One read, one digest: llama.cpp loads the very bytes that were hashed, from memory no one
            # else can change; the file is never opened again.
            sealed = read_sealed(settings.path, after_read=self._after_read)
            sha, source = sealed.sha256, sealed.path
            self._say_once_about_huge_pages()
        try:
            if settings.sha256 is not None and sha != settings.sha256:
                raise LoadRefused(
                    f"the file's sha256 is {sha}, not {settings.sha256}, the digest this model was pinned to "
                    "(the file changed on disk since it was first loaded, or was never that file)", subject="sha256")
            if self._allowed and sha not in self._allowed:
                raise LoadRefused("this model file's sha256 is not allowed", forbidden=True)
            engine = self._engine_factory(settings, self._observer, source)
            embedder = None
            if _embedding_pooling(settings, engine.model) is not None:
                try:
                    embedder = self._embedder_factory(settings, engine.model, self._observer)
                except BaseException:
                    engine.start()  # its thread frees its context and the model on the way out
                    engine.stop()
                    raise
        finally:
            if sealed is not None:
                sealed.close()  # llama.cpp's mapping of the memfd keeps its memory until the model is freed
        template = model_chat_template(engine.model, settings.chat_template)
        if self._on_loaded is not None:
            # Runtime measurement (TDX RTMR3, Nitro PCR16) happens before the model can serve.
            self._on_loaded(settings.name, sha)
        return engine, embedder, sha, template

    def unload(self, name: str, *, timeout: float = 60.0) -> ModelRecord:
        rec = self._records.get(name)
        if rec is None or rec.state in ("failed", "unloading"):
            raise UnknownModel(name)
        if rec.state == "loading":
            raise Conflict(f"The model '{name}' is still loading")
        rec.state = "unloading"
        if rec.embedder is not None:
            off_loop(rec.embedder.stop, timeout=timeout)
        if rec.engine is not None:  # a "ready" record always has its engine
            off_loop(rec.engine.stop, timeout=timeout)
        self._records.pop(name, None)
        off_loop(trim_heap)
        return rec

    def abort_all(self, error: EngineError) -> None:
        """Shutdown's deadline: every model ends what it has admitted or queued with `error`, now."""
        for rec in list(self._records.values()):
            if rec.engine is not None:
                rec.engine.abort_all(error)
            if rec.embedder is not None:
                rec.embedder.abort_all(error)

    def stop_all(self, timeout: float = 30.0) -> None:
        """Shutdown: drain and free every engine (called from the worker's exit hook)."""
        for rec in list(self._records.values()):
            if rec.embedder is not None:
                rec.embedder.stop(timeout=timeout)
            if rec.engine is not None:
                rec.engine.stop(timeout=timeout)
        self._records.clear()


def _build_engine(
    settings: ModelSettings, observer: EngineObserver | None, source: Path, *, backend: BackendConfig | None = None
) -> ModelEngine:
    """`source`: the file llama.cpp opens, the model file itself or its sealed copy (/proc/self/fd/N),
    mapped either way: a copy in memory is mapped, not copied again."""
    model = LlamaModel(source, n_gpu_layers=settings.n_gpu_layers, use_mmap=True, backend=backend)
    try:
        if settings.n_gpu_layers == 0:  # a KV cache on a GPU is the GPU's memory, not this host's
            estimate = kv_estimate(model.ptr, model.meta, n_ctx_seq=settings.n_ctx, n_seq=settings.parallel)
            extra = settings.cache_ram_mib << 20
            if _embedding_pooling(settings, model) is not None:  # the embedding context's cache (one stream)
                extra += kv_estimate(model.ptr, model.meta, n_ctx_seq=settings.n_batch, n_seq=1).bytes
            check_fits(settings.name, estimate, n_ctx_seq=settings.n_ctx, n_seq=settings.parallel,
                       host_cache_bytes=extra)
        threads = settings.n_threads or default_threads()
        return ModelEngine(
            settings.name,
            model,
            n_ctx=settings.n_ctx,
            parallel=settings.parallel,
            n_batch=settings.n_batch,
            n_threads=threads,
            n_threads_batch=settings.n_threads_batch or threads,
            max_queue=settings.max_queue,
            flash_attn=settings.flash_attn,
            cache_ram_bytes=settings.cache_ram_mib << 20,
            observer=observer,
        )
    except BaseException:
        model.close()
        raise


def _embedding_pooling(settings: ModelSettings, model: LlamaModel) -> str | None:
    """The pooling of the model's embedding context, None where it gets none. Its own pooling setting,
    else the GGUF's, else mean; the context exists where the settings ask for embeddings, or where the
    model is a reranker (pooling rank), which serves nothing else. A GGUF that declares rank without a
    classification head to rank with is taken at mean (an explicit `pooling = "rank"` on such a file is
    refused when the context is made)."""
    pooling: str | None = settings.pooling
    if pooling is None:
        pooling = gguf_pooling(model)
        if pooling == "rank" and not classifier_head(model.path):
            pooling = "mean"
    return pooling if settings.embeddings or pooling == "rank" else None


def _build_embedder(settings: ModelSettings, model: LlamaModel, observer: EngineObserver | None) -> Embedder:
    """The model's embedding context (or its reranking one), pooled as `_embedding_pooling` says."""
    threads = settings.n_threads or default_threads()
    return Embedder(
        settings.name,
        model,
        n_tokens=settings.n_batch,
        n_threads=threads,
        n_threads_batch=settings.n_threads_batch or threads,
        pooling=_embedding_pooling(settings, model) or "mean",
        # Without flash attention a vector does not depend on what it is batched with: llama.cpp's CPU
        # flash-attention kernel takes a tiled F16 path for large batches, which moved a short input's
        # vector by up to 1.5e-3 in cosine on Gemma 3 270M against the same input decoded alone.
        flash_attn="off",
        observer=observer,
    )
