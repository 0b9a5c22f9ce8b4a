"""Completions and chat: OpenAI wire format over the engine, JSON or SSE.

A request's greenlet submits to the model's scheduler and waits for events; a watcher greenlet on
the client's socket cancels the generation as soon as the client goes away, so its slot is free
within one decode step, streaming or not.
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps uses for a str

import falcon
import gevent
from gevent.socket import wait_read

from appliance.engine.chat import render_chat
from appliance.engine.llama import SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.engine.scheduler import Delta, DeltaSink, Done, Failed, Generation, GenerationRequest, TokenLogprob
from appliance.settings import LimitsSettings
from appliance.web.errors import ApiError, BadRequest, InternalError
from appliance.web.schemas import ChatRequest, CompletionRequest, parse
from attestation.signing import SSE_DONE

__all__ = ["Inference", "sse_event", "text_chunk_encoder", "SSE_DONE"]

log = logging.getLogger("appliance.http")

_TOKENIZE_INLINE_CHARS = 4096  # longer prompts are tokenized in the thread pool, off the event loop


def sse_event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def text_chunk_encoder(base: dict, *, chat: bool) -> Callable[[str], bytes]:
    """f(text) -> the SSE event of a token chunk without logprobs, byte for byte what sse_event gives
    for the whole object, from a template: only the text is encoded per token (the event loop's turn
    for each token sits on the decode's critical path)."""
    marker = "\x00appliance-text\x00"
    choice = (
        {"index": 0, "delta": {"content": marker}, "logprobs": None, "finish_reason": None}
        if chat
        else {"index": 0, "text": marker, "logprobs": None, "finish_reason": None}
    )
    head, tail = sse_event({**base, "choices": [choice]}).split(json.dumps(marker).encode())

    def encode(text: str) -> bytes:
        # What json.dumps(text, ensure_ascii=False) returns, without building a JSONEncoder per call
        # (this runs between two decodes, cache-cold: every call and object counts).
        return head + _json_string(text).encode() + tail

    return encode


@dataclass
class _Job:
    kind: str  # "completion" | "chat"
    model: str
    gen: Generation
    body: CompletionRequest | ChatRequest
    id: str
    created: int


class Inference:
    """Shared by the OpenAI routes and the original appliance routes."""

    def __init__(
        self,
        models: ModelRegistry,
        limits: LimitsSettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        random_seed: Callable[[], int] = lambda: secrets.randbits(32),
        default_seeds: Callable[[str], int | None] = lambda name: None,
        stream_writes: str = "auto",
        cpus: int = 1,
        stream_written: Callable[[str], None] = lambda writer: None,
    ) -> None:
        self.models = models
        self.limits = limits
        self._stream_writes = stream_writes
        self._cpus = cpus
        self._stream_written = stream_written
        self._wall_clock = wall_clock
        self._random_seed = random_seed
        self._default_seeds = default_seeds

    # -- falcon responders -------------------------------------------------------------------

    def on_post_completions(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse(CompletionRequest, req.context.json)
        engine = self.models.get(body.model)
        if isinstance(body.prompt, str):
            prompt = self._tokenize(engine, body.prompt, add_special=True)
        elif isinstance(body.prompt[0], str):
            prompt = self._tokenize(engine, body.prompt[0], add_special=True)
        else:
            if any(not 0 <= t < engine.model.n_vocab for t in body.prompt):
                raise BadRequest("prompt: token ids must be within the model's vocabulary", param="prompt")
            prompt = list(body.prompt)
        if body.logprobs is not None and body.logprobs > self.limits.max_top_logprobs:
            raise BadRequest(f"logprobs: at most {self.limits.max_top_logprobs}", param="logprobs")
        limit = body.max_tokens if body.max_tokens is not None else self.limits.default_max_tokens
        self._run(req, resp, "completion", body, engine, prompt, limit, body.logprobs, "max_tokens")

    def on_post_chat(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse(ChatRequest, req.context.json)
        rec = self.models.record(body.model)
        engine = self.models.get(body.model)
        model = engine.model
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
        template = rec.chat_template
        render = functools.partial(
            render_chat,
            template,
            messages,
            model_name=body.model,
            bos_token=model.token_text(model.bos) if model.bos >= 0 else "",
            eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
        )
        long_chat = sum(len(m["content"]) for m in messages) > _TOKENIZE_INLINE_CHARS
        if template is not None and template.name is not None and long_chat:
            # A built-in template is a llama.cpp call: a long chat renders in the thread pool, as a
            # long prompt tokenizes.
            text = gevent.get_hub().threadpool.apply(render)
        else:
            text = render()
        bos_text = model.token_text(model.bos) if model.bos >= 0 else None
        add_bos = not (bos_text and text.startswith(bos_text))
        prompt = self._tokenize(engine, text, add_special=add_bos, parse_special=True)
        top = None
        if body.logprobs:
            top = body.top_logprobs or 0
            if top > self.limits.max_top_logprobs:
                raise BadRequest(f"top_logprobs: at most {self.limits.max_top_logprobs}", param="top_logprobs")
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        self._run(req, resp, "chat", body, engine, prompt, body.token_limit, top, limit_param)

    # -- the common path ---------------------------------------------------------------------

    def _tokenize(self, engine, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        if len(text) <= _TOKENIZE_INLINE_CHARS:
            return engine.model.tokenize(text, add_special=add_special, parse_special=parse_special)
        return gevent.get_hub().threadpool.apply(
            engine.model.tokenize, (text,), {"add_special": add_special, "parse_special": parse_special}
        )

    def _run(self, req, resp, kind, body, engine, prompt, max_tokens, logprobs, limit_param) -> None:
        cap = self.limits.max_prompt_tokens
        if cap and len(prompt) > cap:
            param = "messages" if kind == "chat" else "prompt"
            raise BadRequest(f"{param}: the prompt has {len(prompt)} tokens; at most {cap} are allowed", param=param)
        stops = body.stops()
        if len(stops) > self.limits.max_stop:
            raise BadRequest(f"stop: at most {self.limits.max_stop} stop strings", param="stop")
        if any(len(s) > self.limits.max_stop_length for s in stops):
            raise BadRequest(f"stop: each stop string is at most {self.limits.max_stop_length} characters", param="stop")
        if max_tokens is None or max_tokens == -1:
            max_tokens = self.limits.max_tokens
        elif max_tokens > self.limits.max_tokens:
            raise BadRequest(f"{limit_param}: at most {self.limits.max_tokens}", param=limit_param)
        if body.n_ctx is not None and body.n_ctx > engine.n_ctx:
            raise BadRequest(f"n_ctx: this model's context per request is at most {engine.n_ctx}", param="n_ctx")
        seed = body.seed
        if seed is None or seed == -1:
            seed = self._default_seeds(body.model)
            if seed is None:
                seed = self._random_seed()
        sampling = SamplingParams(
            temperature=_pick(body.temperature, 0.8),
            top_k=_pick(body.top_k, 40),
            top_p=_pick(body.top_p, 0.95),
            min_p=_pick(body.min_p, 0.05),
            repeat_penalty=_pick(body.repeat_penalty, 1.0),
            repeat_last_n=_pick(body.repeat_last_n, 64),
            presence_penalty=_pick(body.presence_penalty, 0.0),
            frequency_penalty=_pick(body.frequency_penalty, 0.0),
            seed=seed & 0xFFFFFFFF,
        )
        gen = engine.submit(
            GenerationRequest(
                prompt=tuple(prompt),
                max_tokens=max_tokens,
                sampling=sampling,
                stop=stops,
                ignore_eos=body.ignore_eos,
                logprobs=logprobs,
                n_threads=body.n_threads,
                n_ctx=body.n_ctx,
                stream=bool(body.stream),
            )
        )
        prefix = "cmpl-" if kind == "completion" else "chatcmpl-"
        job = _Job(kind, body.model, gen, body, prefix + uuid.uuid4().hex, int(self._wall_clock()))
        watcher = _watch_disconnect(req.env.get("gunicorn.socket"), gen)
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-store")
            resp.set_header("X-Accel-Buffering", "no")
            # Plain token chunks may be written by the scheduler thread (logprob chunks are built here).
            direct = _DirectOut() if logprobs is None and self._writes_from_scheduler(engine) else None
            resp.stream = _Stream(self._sse(job, direct), on_close=lambda: _finish(gen, watcher), direct=direct)
            return
        try:
            resp.media = self._collect(job)
        finally:
            _finish(gen, watcher)

    def _writes_from_scheduler(self, engine) -> bool:
        """Whether a streamed token should be written between two decodes rather than during one:
        when the decode threads leave no CPU to the event loop (server.stream_writes = auto)."""
        if self._stream_writes == "auto":
            return engine.n_threads >= self._cpus
        return self._stream_writes == "scheduler"

    def _collect(self, job: _Job) -> dict:
        text: list[str] = []
        lps: list[TokenLogprob] = []
        for ev in job.gen.events():
            if isinstance(ev, Delta):
                text.append(ev.text)
                lps.extend(ev.logprobs)
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Done):
                return self._final(job, "".join(text), lps, ev)
        raise InternalError()

    def _final(self, job: _Job, text: str, lps: list[TokenLogprob], done: Done) -> dict:
        want_lp = job.gen.request.logprobs is not None
        if job.kind == "completion":
            choice = {
                "index": 0,
                "text": text,
                "logprobs": _completion_logprobs(lps, len(job.body.prompt) if isinstance(job.body.prompt, str) else 0)
                if want_lp
                else None,
                "finish_reason": done.finish_reason,
            }
            obj = "text_completion"
        else:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": [_chat_logprob(lp) for lp in lps]} if want_lp else None,
                "finish_reason": done.finish_reason,
            }
            obj = "chat.completion"
        return {
            "id": job.id,
            "object": obj,
            "created": job.created,
            "model": job.model,
            "system_fingerprint": None,
            "choices": [choice],
            "usage": _usage(done),
            "timings": _timings(done),
        }

    def _sse(self, job: _Job, direct: _DirectOut | None = None) -> Iterator[bytes]:
        chat = job.kind == "chat"
        obj = "chat.completion.chunk" if chat else "text_completion"
        want_lp = job.gen.request.logprobs is not None

        def chunk(choices: list, **extra) -> bytes:
            return sse_event(
                {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                 "system_fingerprint": None, "choices": choices, **extra}
            )

        text_chunk = text_chunk_encoder(
            {"id": job.id, "object": obj, "created": job.created, "model": job.model, "system_fingerprint": None},
            chat=chat,
        )

        # OpenAI counts text_offset from the start of the prompt, across chunks.
        offset = len(job.body.prompt) if not chat and isinstance(job.body.prompt, str) else 0
        # Runs at the first next(), after the server has attached its writer (if it has one).
        sink = _text_sink(direct.write, text_chunk) if direct is not None and direct.write is not None else None
        self._stream_written("event_loop" if sink is None else "scheduler")
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
        try:
            for ev in job.gen.events(sink):
                if isinstance(ev, Delta):
                    if not ev.text and not ev.logprobs:
                        continue
                    if not want_lp:
                        yield text_chunk(ev.text)
                    elif chat:
                        lp = {"content": [_chat_logprob(x) for x in ev.logprobs]}
                        yield chunk([{"index": 0, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}])
                    else:
                        lp = _completion_logprobs(list(ev.logprobs), offset) if want_lp else None
                        offset += sum(len(x.token) for x in ev.logprobs)
                        yield chunk([{"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None}])
                elif isinstance(ev, Done):
                    last = {"index": 0, "logprobs": None, "finish_reason": ev.finish_reason}
                    last.update({"delta": {}} if chat else {"text": ""})
                    usage_inline = None if job.body.include_usage else _usage(ev)
                    yield chunk([last], usage=usage_inline, timings=_timings(ev))
                    if job.body.include_usage:
                        yield chunk([], usage=_usage(ev))
                    yield SSE_DONE
                    return
                elif isinstance(ev, Failed):
                    yield sse_event(ev.error.body())
                    return
        except ApiError as e:
            yield sse_event(e.body())
        except Exception:
            log.exception("stream failed")
            yield sse_event(InternalError().body())


def _text_sink(write: Callable[[bytes], bool], encode: Callable[[str], bytes]) -> DeltaSink:
    def sink(delta: Delta) -> bool:  # the scheduler thread, between two decodes
        return write(encode(delta.text)) if delta.text else True

    return sink


class _DirectOut:
    """Where a stream's token chunks go once the server attaches a direct writer (direct_writes)."""

    write: Callable[[bytes], bool] | None = None


class _Stream:
    """A WSGI response iterable whose close() (called by the server, also on disconnect) cancels."""

    def __init__(self, it: Iterator[bytes], on_close: Callable[[], None], direct: _DirectOut | None = None) -> None:
        self._it = it
        self._on_close = on_close
        self._direct = direct

    def __iter__(self):
        return iter(self._it)  # iterated directly: no extra Python frame per token

    def attach_writer(self, write: Callable[[bytes], bool]) -> bool:
        """Called before iteration starts; True if token chunks will go to `write`."""
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


def _watch_disconnect(sock, gen: Generation):
    """Cancel the generation when the client closes its connection (EOF or error on the socket)."""
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


def _finish(gen: Generation, watcher) -> None:
    gen.close()
    if watcher is not None:
        watcher.kill(block=False)


def _pick(value, default):
    return default if value is None else value


def _usage(done: Done) -> dict:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _timings(done: Done) -> dict:
    t = done.timings
    return {
        "prompt_n": t.prompt_n,
        "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_second": round(t.prompt_per_second, 3),
        "predicted_n": t.predicted_n,
        "predicted_ms": round(t.predicted_ms, 3),
        "predicted_per_second": round(t.predicted_per_second, 3),
        "queued_ms": round(t.queued_ms, 3),
    }


def _completion_logprobs(lps: list[TokenLogprob], start: int) -> dict:
    offsets, pos = [], start
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {
        "tokens": [lp.token for lp in lps],
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{t: v for t, _, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _chat_logprob(lp: TokenLogprob) -> dict:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in lp.top],
    }
