"""Fixtures and fakes shared by every tier: the one place the fakes live.

The fake model, engine and registry stand in for llama.cpp and the scheduler only; everything
between the WSGI call and `engine.submit()` (middleware, routing, parsing, prompt building, response
shaping, error handling) is the real code. The contract tier (tests/contract) and the unit tier's
in-process app tests use them; import them as `from tests.conftest import FakeRegistry`.
"""

from __future__ import annotations

import json
from pathlib import Path

import falcon
import falcon.testing
import numpy as np

from appliance.engine.chat import ChatTemplate
from appliance.engine.embedder import l2_normalized
from appliance.engine.errors import (
    Conflict,
    EmbeddingsDisabled,
    InputTooLong,
    InvalidPrompt,
    LoadRefused,
    ModelNotReady,
    PromptTooLong,
    TooManyChoices,
    UnknownModel,
)
from appliance.engine.events import Delta, Done, Failed, GenerationRequest, Timings, TokenLogprob, Usage
from appliance.engine.grammar import check_gbnf, schema_gbnf
from appliance.engine.prompt import (
    Message,
    chat_tokens,
    content_tokens,
    infill_tokens,
    text_tokens,
    token_ids,
    token_pieces,
)
from appliance.engine.registry import ModelRecord
from appliance.engine.scheduler import check_logit_bias
from appliance.settings import ModelSettings
from attestation import signing

__all__ = ["FIXED_NOW", "FakeModel", "FakeGeneration", "FakeEngine", "FakeGrammar", "FakeEmbedder", "FakeRegistry"]

FIXED_NOW = 1_700_000_000.0


# ---------------------------------------------------------------------------------------------
# The fake model, engine and registry


class FakeModel:
    """One token per character; BOS 1, EOS 2; a 64-token vocabulary."""

    n_vocab = 64
    bos = 1
    eos = 2
    n_params = 123_456

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        return ([self.bos] if add_special else []) + [3 + ord(c) % 61 for c in text]

    def token_text(self, token: int) -> str:
        return {1: "<s>", 2: "</s>"}.get(token, chr(token))

    def fim_tokens(self) -> tuple[int, int, int, int, int]:
        return (-1, -1, -1, -1, -1)  # no fill-in-the-middle tokens

    def shown_piece(self, token: int) -> bytes:
        """BOS and EOS spelt out; 0 half a character (b"\xc3"); 35 a space; else the character
        `tokenize` maps to it from "=" to "y" (so lowercase text with spaces comes back whole)."""
        special = {0: b"\xc3", 1: b"<s>", 2: b"</s>", 35: b" "}
        return special.get(token, chr(61 + token - 3).encode())


class FakeGeneration:
    """A `Generation` look-alike: replays a fixed script of pieces as Delta events, then Done; for
    each of the request's `n` choices in turn."""

    def __init__(self, request: GenerationRequest, pieces: tuple[str, ...], fail_with: Exception | None) -> None:
        self.request = request
        self._pieces = pieces
        self._fail_with = fail_with
        self.cancelled = False
        self.closed = False

    def events(self, sink=None):
        """Like Generation.events: with a sink, deltas go to it (here, on this thread) until it
        declines one; it is offered again after the next delta yielded here."""
        req = self.request
        n = min(req.max_tokens, len(self._pieces))
        if self._fail_with is not None:
            yield Delta(self._pieces[0], 1, ())
            if isinstance(self._fail_with, Failed):
                yield self._fail_with
                return
            raise self._fail_with
        sinking = sink is not None
        for index in range(req.n):
            for piece in self._pieces[:n]:
                lps = ()
                if req.logprobs is not None:
                    top = tuple((f"alt{i}", tuple(f"alt{i}".encode()), -1.5 - i) for i in range(req.logprobs))
                    lps = (TokenLogprob(piece, tuple(piece.encode()), -0.25, top),)
                if sinking:
                    sinking = sink(Delta(piece, 1, lps, index))
                    continue
                yield Delta(piece, 1, lps, index)
                sinking = sink is not None
            finish = "length" if n < len(self._pieces) else "stop"
            cached = min(2, len(req.prompt) - 1)
            yield Done(
                finish,
                Usage(prompt_tokens=len(req.prompt), completion_tokens=n, cached_tokens=cached),
                Timings(prompt_n=len(req.prompt) - cached, prompt_ms=12.5, predicted_n=n, predicted_ms=30.0, queued_ms=0.5),
                index,
            )

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        self.closed = True


class FakeEngine:
    PIECES = ("Hello", ",", " wörld", "!")

    def __init__(self, name: str, *, n_ctx: int = 256, parallel: int = 2) -> None:
        self.name = name
        self.model = FakeModel()
        self.n_ctx = n_ctx
        self.parallel = parallel
        self.n_threads = 4
        self.busy_slots = 0
        self.queue_depth = 0
        self.healthy = True
        self.submitted: list[GenerationRequest] = []
        self.generations: list[FakeGeneration] = []
        self.fail_with: Exception | Failed | None = None
        self.raise_on_submit: Exception | None = None

    def submit(self, request: GenerationRequest) -> FakeGeneration:
        if self.raise_on_submit is not None:
            raise self.raise_on_submit
        limit = min(self.n_ctx, request.n_ctx or self.n_ctx)
        if len(request.prompt) >= limit:
            raise PromptTooLong(limit=limit, length=len(request.prompt), request_limit=limit < self.n_ctx)
        check_logit_bias(request.sampling.logit_bias, self.model.n_vocab)
        if not 1 <= request.n <= self.parallel:
            raise TooManyChoices(request.n, self.parallel)
        self.submitted.append(request)
        gen = FakeGeneration(request, self.PIECES, self.fail_with)
        self.generations.append(gen)
        return gen

    def stop(self, *, timeout: float = 30.0) -> bool:
        return True

    def host_cache_status(self) -> dict[str, int] | None:
        return None  # (the cache's own tests run the real engine: tests/unit/engine/test_kvcache.py)


class FakeEmbeddingJob:
    def __init__(self, vectors: list) -> None:
        self._vectors = vectors

    def wait(self) -> list:
        return self._vectors


class FakeEmbedder:
    """The `Embedder` surface: a unit vector of 8 dimensions per input, from its token ids; the real
    refusals (an empty input, one longer than 32 tokens, an id outside the vocabulary)."""

    dimensions = 8
    n_tokens = 32
    pooling = "mean"

    def __init__(self, model: FakeModel) -> None:
        self.model = model
        self.submitted: list[list[list[int]]] = []

    def submit(self, inputs: list[list[int]]) -> FakeEmbeddingJob:
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise InvalidPrompt(f"input {i} is empty (no tokens)")
            if len(tokens) > self.n_tokens:
                raise InputTooLong(index=i, length=len(tokens), limit=self.n_tokens)
            if any(not 0 <= t < self.model.n_vocab for t in tokens):
                raise InvalidPrompt(f"input {i}: token ids must be within the model's vocabulary")
        self.submitted.append(inputs)
        return FakeEmbeddingJob([l2_normalized(self.vector(t)) for t in inputs])

    @staticmethod
    def vector(tokens: list[int]) -> np.ndarray:
        """The unnormalized vector of an input (tests compare with it)."""
        v = np.zeros(8, dtype=np.float32)
        for k, t in enumerate(tokens):
            v[(t + k) % 8] += 1 + (t % 5)
        return v


class FakeGrammar:
    """What the fake registry's `grammar` returns: the GBNF text it checked."""

    def __init__(self, gbnf: str) -> None:
        self.gbnf = gbnf


class FakeRegistry:
    """The `ModelRegistry` surface the app uses, with the real registry's error semantics."""

    def __init__(self) -> None:
        self._records: dict[str, ModelRecord] = {}

    def add(self, name: str, *, state: str = "ready", n_ctx: int = 256, parallel: int = 2, chat_template: str | None = "chatml",
            embeddings: bool = False) -> ModelRecord:
        """`chat_template` as the model setting gives it (a built-in name or Jinja); None: no template."""
        settings = ModelSettings(name=name, path=Path(f"/models/{name}.gguf"), n_ctx=n_ctx, parallel=parallel)
        engine = FakeEngine(name, n_ctx=n_ctx, parallel=parallel)
        template = ChatTemplate.configured(chat_template) if chat_template is not None else None
        rec = ModelRecord(name, settings, state=state, chat_template=template, engine=engine,
                          embedder=FakeEmbedder(engine.model) if embeddings else None)
        if state == "ready":
            rec.sha256 = "ab" * 32
            rec.size_bytes = 4096
            rec.n_params = engine.model.n_params
            rec.n_ctx = n_ctx
            rec.loaded_at = FIXED_NOW
            rec.load_seconds = 0.25
        elif state == "failed":
            rec.engine = None
            rec.error = "llama.cpp could not load the file"
        self._records[name] = rec
        return rec

    def engine(self, name: str) -> FakeEngine:
        return self._records[name].engine

    # -- what the app calls --------------------------------------------------------------------

    def records(self) -> list[ModelRecord]:
        return list(self._records.values())

    def devices(self) -> list[dict]:
        return [{"name": "CPU", "type": "cpu", "description": "fake CPU", "module": "cpu-haswell"}]

    def get(self, name: str) -> FakeEngine:
        rec = self._records.get(name)
        if rec is None or rec.state == "failed":
            raise UnknownModel(name)
        if rec.state != "ready":
            raise ModelNotReady(name, rec.state)
        return rec.engine

    def text_prompt(self, name: str, prompt: str | list[int]) -> tuple[FakeEngine, list[int]]:
        engine = self.get(name)
        if isinstance(prompt, str):
            return engine, text_tokens(engine.model, prompt)  # type: ignore[arg-type]
        return engine, token_ids(engine.model, prompt)  # type: ignore[arg-type]

    def infill_prompt(
        self, name: str, prefix: str | list[int], suffix: str, *, n_predict: int
    ) -> tuple[FakeEngine, list[int]]:
        engine = self.get(name)
        model = engine.model
        return engine, infill_tokens(model, prefix, suffix, n_batch=64, n_predict=n_predict, n_ctx=engine.n_ctx)  # type: ignore[arg-type]

    def chat_prompt(self, name: str, messages: list[Message]) -> tuple[FakeEngine, list[int]]:
        engine = self.get(name)
        template = self._records[name].chat_template
        return engine, chat_tokens(engine.model, template, messages, model_name=name)  # type: ignore[arg-type]

    def tokenize(self, name: str, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return content_tokens(self.get(name).model, text, add_special=add_special, parse_special=parse_special)  # type: ignore[arg-type]

    def pieces(self, name: str, ids: list[int]) -> list[bytes]:
        return token_pieces(self.get(name).model, ids)  # type: ignore[arg-type]

    def grammar(self, name: str, *, gbnf: str | None = None, schema: object = None) -> FakeGrammar:
        """The real checks (GBNF syntax, schema keywords, conversion); no llama.cpp compile."""
        self.get(name)
        return FakeGrammar(check_gbnf(gbnf) or gbnf if gbnf is not None else schema_gbnf(schema))

    def embedder(self, name: str) -> FakeEmbedder:
        self.get(name)
        embedder = self._records[name].embedder
        if embedder is None:
            raise EmbeddingsDisabled(name)
        return embedder

    def embedding_inputs(self, name: str, inputs: list) -> tuple[FakeEmbedder, list[list[int]]]:
        embedder = self.embedder(name)
        if all(isinstance(i, str) for i in inputs):
            return embedder, [text_tokens(embedder.model, i) for i in inputs]  # type: ignore[arg-type]
        return embedder, [token_ids(embedder.model, i) for i in inputs]  # type: ignore[arg-type]

    def cpu_backend(self) -> None:
        return None

    def on_loaded(self, fn: object) -> None:
        pass

    def record(self, name: str) -> ModelRecord:
        rec = self._records.get(name)
        if rec is None:
            raise UnknownModel(name)
        return rec

    def ready(self) -> bool:
        ready = [r for r in self._records.values() if r.state == "ready"]
        return bool(ready) and all(r.engine.healthy for r in ready)

    def load(self, settings: ModelSettings) -> ModelRecord:
        existing = self._records.get(settings.name)
        if existing is not None and existing.state != "failed":
            raise Conflict(f"A model named '{settings.name}' is already {existing.state}")
        if not settings.path.is_file():
            raise LoadRefused("no such file")
        rec = self.add(settings.name, n_ctx=settings.n_ctx, parallel=settings.parallel)
        rec.settings = settings
        return rec

    def unload(self, name: str, *, timeout: float = 60.0) -> ModelRecord:
        rec = self._records.get(name)
        if rec is None or rec.state in ("failed", "unloading"):
            raise UnknownModel(name)
        if rec.state == "loading":
            raise Conflict(f"The model '{name}' is still loading")
        rec.engine.stop(timeout=timeout)
        return self._records.pop(name)

    def stop_all(self, timeout: float = 30.0) -> None:
        self._records.clear()


class SignedClient:
    """An in-process test client whose every response must verify against the app's published key."""

    def __init__(self, app: falcon.App) -> None:
        self.client = falcon.testing.TestClient(app)
        keys = self.client.simulate_get("/v1/keys").json
        self.key = signing.public_key_from_b64(keys["public_key"])

    def post(self, path: str, body: object) -> falcon.testing.Result:
        raw = json.dumps(body).encode()
        r = self.client.simulate_post(path, body=raw, headers={"Content-Type": "application/json"})
        signing.verify_response(self.key, request=signing.RequestInfo("POST", path, raw), status=r.status_code,
                                headers=dict(r.headers), body=r.content)
        return r


def openai_error(r: falcon.testing.Result, status: int) -> dict:
    """The OpenAI error object of a response with this status (and nothing else in the body)."""
    assert r.status_code == status, r.text
    body = r.json
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
