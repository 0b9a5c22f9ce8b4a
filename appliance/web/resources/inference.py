"""Completions and chat, on the OpenAI routes and the original appliance routes: JSON or SSE.

A request's greenlet asks the registry for the model's engine and the prompt's tokens (tokenized off
the event loop), submits, and waits for events; a watcher greenlet on the client's socket cancels the
generation as soon as the client goes away, so its slot is free within one decode step, streaming or
not. The wire format is web/openai.py; where the bytes go is web/streams.py.

A chat that calls tools (`tools`, tool_choice not none) is held by a grammar to the generic format's
JSON reply (engine/grammar.py `tool_calls_schema`), and its prompt carries the tool instruction
(engine/chat.py). The reply is answered as tool calls or as content (openai.py `tool_reply`). Streamed,
tool calls come at the end, once the reply is complete (they are only known to parse then); a text
reply (`{"response": ...}`) streams its text as it is decoded.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any, cast

import falcon

from appliance.engine.chat import ToolPrompt
from appliance.engine.errors import InvalidGrammar
from appliance.engine.events import Delta, DeltaSink, Done, Failed, GenerationRequest, TokenLogprob
from appliance.engine.grammar import tool_calls_schema
from appliance.engine.llama import Grammar, SamplingParams
from appliance.engine.mailbox import Generation
from appliance.engine.prompt import Message, chat_tokens
from appliance.engine.registry import ModelRegistry
from appliance.engine.scheduler import ModelEngine
from appliance.osthreads import off_loop
from appliance.settings import LimitsSettings
from appliance.web import openai
from appliance.web.errors import BadRequest, ClientClosedRequest, InternalError, from_engine, to_api_error
from appliance.web.schemas import ChatMessage, ChatRequest, CompletionRequest, parse
from appliance.web.streams import DirectOut, GenerationStream, StreamOutcome, Writer, finish, watch_disconnect

__all__ = ["Inference", "chat_messages", "prompt_source"]

log = logging.getLogger("appliance.http")


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
        tool_call_id: Callable[[], str] = lambda: "call_" + secrets.token_hex(12),
    ) -> None:
        self.models = models
        self.limits = limits
        self._stream_writes = stream_writes
        self._cpus = cpus
        self._stream_written = stream_written
        self._wall_clock = wall_clock
        self._random_seed = random_seed
        self._default_seeds = default_seeds
        self._tool_call_id = tool_call_id

    # -- falcon responders -------------------------------------------------------------------

    def on_post_completions(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "prompt"
        body = parse(CompletionRequest, req.context.json)
        source = prompt_source(body.prompt)
        limit = body.max_tokens if body.max_tokens is not None else self.limits.default_max_tokens
        if body.suffix is not None:  # fill in the middle: the prompt is what comes before
            engine, prompt = self.models.infill_prompt(body.model, source, body.suffix, n_predict=limit)
        else:
            engine, prompt = self.models.text_prompt(body.model, source)
        if body.logprobs is not None and body.logprobs > self.limits.max_top_logprobs:
            raise BadRequest(f"logprobs: at most {self.limits.max_top_logprobs}", param="logprobs")
        offset = len(body.prompt) if isinstance(body.prompt, str) else 0
        echo = ""
        if body.echo:
            # Token ids are echoed as their text, control tokens spelt out (as /detokenize has them).
            if isinstance(source, str):
                echo = source
            else:
                echo = b"".join(self.models.pieces(body.model, source)).decode("utf-8", "replace")
        x = openai.Exchange("completion", "cmpl-" + uuid.uuid4().hex, int(self._wall_clock()), body.model,
                            body.logprobs is not None, body.include_usage, offset, body.n, echo)
        self._run(req, resp, x, body, engine, prompt, limit, body.logprobs, "max_tokens")

    def on_post_chat(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "messages"
        body = parse(ChatRequest, req.context.json)
        use = body.tool_use()
        grammar = None
        if use is None:
            engine, prompt = self.models.chat_prompt(body.model, chat_messages(body.messages))
        else:
            if body.stream and body.n > 1:
                raise BadRequest("n: a stream that calls tools has one choice", param="n")
            if body.stream and body.logprobs:
                raise BadRequest("logprobs: not in a stream that calls tools", param="logprobs")
            schema = tool_calls_schema(use.specs, mode=use.mode, parallel=use.parallel)
            try:  # checked and compiled off the event loop
                grammar = self.models.grammar(body.model, schema=schema)
            except InvalidGrammar as e:
                raise from_engine(e, grammar_param="tools") from None
            engine = self.models.get(body.model)
            tools = ToolPrompt(use.tools, use.mode == "required", use.function, use.parallel)
            prompt = off_loop(chat_tokens, engine.model, self.models.record(body.model).chat_template,
                              chat_messages(body.messages), model_name=body.model, tools=tools)
        top = None
        if body.logprobs:
            top = body.top_logprobs or 0
            if top > self.limits.max_top_logprobs:
                raise BadRequest(f"top_logprobs: at most {self.limits.max_top_logprobs}", param="top_logprobs")
        limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        x = openai.Exchange("chat", "chatcmpl-" + uuid.uuid4().hex, int(self._wall_clock()), body.model,
                            top is not None, body.include_usage, n=body.n,
                            call_id=self._tool_call_id if use is not None else None)
        predicted: tuple[int, ...] = ()
        if body.prediction is not None and (text := body.prediction.text()):
            predicted = tuple(off_loop(engine.model.tokenize, text, add_special=False))
        self._run(req, resp, x, body, engine, prompt, body.token_limit, top, limit_param, grammar, predicted)

    # -- the common path ---------------------------------------------------------------------

    def _run(
        self,
        req: falcon.Request,
        resp: falcon.Response,
        x: openai.Exchange,
        body: CompletionRequest | ChatRequest,
        engine: ModelEngine,
        prompt: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        limit_param: str,
        grammar: Grammar | None = None,
        prediction: tuple[int, ...] = (),
    ) -> None:
        """`grammar`: one the caller built (a chat that calls tools); else the body's constraint, if any."""
        cap = self.limits.max_prompt_tokens
        if cap and len(prompt) > cap:
            param = x.prompt_param
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
        if body.n > engine.parallel:  # the choices are decoded side by side, one slot each
            raise BadRequest(
                f"n: this model decodes at most {engine.parallel} choices at once (its parallel slots)", param="n"
            )
        if body.n_ctx is not None and body.n_ctx > engine.n_ctx:
            raise BadRequest(f"n_ctx: this model's context per request is at most {engine.n_ctx}", param="n_ctx")
        constraint = body.output_constraint() if grammar is None else None
        if constraint is not None:  # checked and compiled off the event loop
            try:
                grammar = self.models.grammar(body.model, gbnf=constraint.gbnf, schema=constraint.schema)
            except InvalidGrammar as e:
                raise from_engine(e, grammar_param=constraint.param) from None
        sampling = sampling_params(body, grammar, self._default_seeds, self._random_seed)
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
                prediction=prediction,
                n=body.n,
            )
        )
        watcher = watch_disconnect(req.env.get("gunicorn.socket"), gen)
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-store")
            resp.set_header("X-Accel-Buffering", "no")
            # Plain token chunks may be written by the scheduler thread (logprob chunks are built here).
            plain = logprobs is None and body.n == 1 and x.call_id is None
            direct = DirectOut() if plain and self._writes_from_scheduler(engine) else None
            outcome = StreamOutcome()
            resp.stream = GenerationStream(
                self._sse(x, gen, outcome, direct), outcome, on_close=lambda: finish(gen, watcher), direct=direct
            )
            return
        try:
            resp.media = self._collect(x, gen)
        finally:
            finish(gen, watcher)

    def _writes_from_scheduler(self, engine: ModelEngine) -> bool:
        """Whether a streamed token should be written between two decodes rather than during one:
        when the decode threads leave no CPU to the event loop (server.stream_writes = auto)."""
        if self._stream_writes == "auto":
            return engine.n_threads >= self._cpus
        return self._stream_writes == "scheduler"

    def _collect(self, x: openai.Exchange, gen: Generation) -> dict[str, object]:
        text: list[list[str]] = [[] for _ in range(x.n)]
        lps: list[list[TokenLogprob]] = [[] for _ in range(x.n)]
        choices: list[openai.Choice] = []
        for ev in gen.events():
            if isinstance(ev, Delta):
                text[ev.index].append(ev.text)
                lps[ev.index].extend(ev.logprobs)
            elif isinstance(ev, Failed):
                raise from_engine(ev.error, prompt_param=x.prompt_param)
            elif isinstance(ev, Done):
                choices.append(openai.Choice("".join(text[ev.index]), lps[ev.index], ev))
                if len(choices) == x.n:
                    return openai.final_object(x, choices)
        if gen.cancelled:  # the events end early only when the disconnect watcher cancelled them
            raise ClientClosedRequest()
        raise InternalError()

    def _sse(self, x: openai.Exchange, gen: Generation, outcome: StreamOutcome, direct: DirectOut | None) -> Iterator[bytes]:
        text_chunk = openai.text_chunk_encoder(openai.chunk_base(x), chat=x.kind == "chat")
        # Runs at the first next(), after the server has attached its writer (if it has one).
        sink = _text_sink(direct.write, text_chunk) if direct is not None and direct.write is not None else None
        self._stream_written("event_loop" if sink is None else "scheduler")
        opening = openai.opening_chunk(x)
        if opening is not None:
            yield opening
        if x.call_id is not None:
            yield from self._sse_tools(x, x.call_id, gen, outcome)
            return
        if x.n > 1:
            yield from self._sse_choices(x, gen, outcome)
            return
        offset = x.text_offset
        plain = not x.logprobs
        try:
            for ev in gen.events(sink):
                if plain and type(ev) is Delta:  # the usual event: one token's text
                    if ev.text:
                        yield text_chunk(ev.text)
                    continue
                if isinstance(ev, Done):
                    outcome.finish_reason = ev.finish_reason
                    outcome.usage = openai.usage(ev)
                elif isinstance(ev, Failed):
                    outcome.finish_reason = "error"
                events, offset = openai.chunks(x, ev, text_chunk, offset)
                yield from events
                if not isinstance(ev, Delta):
                    return
        except Exception as e:
            yield _stream_failed(e, x, outcome)

    def _sse_choices(self, x: openai.Exchange, gen: Generation, outcome: StreamOutcome) -> Iterator[bytes]:
        """The events of a stream of n > 1 choices (after its opening): each chunk one choice's, by its
        index; the finish reason and usage attested at the end are the last choice's and the totals."""
        base = openai.chunk_base(x)
        encoders = [openai.text_chunk_encoder(base, chat=x.kind == "chat", index=i) for i in range(x.n)]
        offsets = [x.text_offset] * x.n
        dones: list[Done] = []
        try:
            for ev in gen.events():
                last = False
                if isinstance(ev, Done):
                    dones.append(ev)
                    last = len(dones) == x.n
                    if last:
                        ev = Done.merged(dones)
                        outcome.finish_reason = ev.finish_reason
                        outcome.usage = openai.usage(ev)
                elif isinstance(ev, Failed):
                    outcome.finish_reason = "error"
                i = ev.index if isinstance(ev, (Delta, Done)) else 0
                events, offsets[i] = openai.chunks(x, ev, encoders[i], offsets[i], last=last)
                yield from events
                if isinstance(ev, Failed) or last:
                    return
        except Exception as e:
            yield _stream_failed(e, x, outcome)


    def _sse_tools(
        self, x: openai.Exchange, call_id: Callable[[], str], gen: Generation, outcome: StreamOutcome
    ) -> Iterator[bytes]:
        """The events of a stream that calls tools (after its opening; one choice): a text reply's
        text as it is decoded; tool calls (or a reply that did not complete, as its raw text) at the
        end, then the finish chunk."""
        text_chunk = openai.text_chunk_encoder(openai.chunk_base(x), chat=True)
        reader = openai.ResponseText()
        try:
            for ev in gen.events():
                if isinstance(ev, Delta):
                    streamed = reader.feed(ev.text)
                    if streamed:
                        yield text_chunk(streamed)
                    continue
                if isinstance(ev, Done):
                    reply = openai.tool_reply(reader.text, ev.finish_reason, call_id)
                    if reply.tool_calls is not None:
                        yield from openai.tool_call_chunks(x, reply.tool_calls)
                    elif reply.content and not reader.streaming:
                        yield text_chunk(reply.content)
                    ev = replace(ev, finish_reason=reply.finish_reason)
                    outcome.finish_reason = ev.finish_reason
                    outcome.usage = openai.usage(ev)
                else:
                    outcome.finish_reason = "error"
                events, _ = openai.chunks(x, ev, text_chunk, 0)
                yield from events
                return
        except Exception as e:
            yield _stream_failed(e, x, outcome)


def _stream_failed(e: Exception, x: openai.Exchange, outcome: StreamOutcome) -> bytes:
    """The error event that ends a stream after its 200 (an unexpected error: logged, answered generically)."""
    err = to_api_error(e, prompt_param=x.prompt_param)
    if err is None:
        log.exception("stream failed")
        err = InternalError()
    outcome.finish_reason = "error"
    return openai.error_event(err)


def prompt_source(prompt: str | list[str] | list[int]) -> str | list[int]:
    """A completion's prompt as the registry takes it: text, or token ids."""
    source = prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], str) else prompt
    # not a list[str] here: the validator allows exactly one string in one, and that was taken
    return cast("str | list[int]", source)


def chat_messages(messages: Sequence[ChatMessage]) -> list[Message]:
    """A chat's messages as the template takes them (text parts joined; an assistant's tool calls and
    a tool result's call id where given)."""
    out: list[Message] = []
    for m in messages:
        msg: Message = {"role": m.role, "content": m.text()}
        if m.name:
            msg["name"] = m.name
        if m.tool_calls:
            msg["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _text_sink(write: Writer, encode: Callable[[str], bytes]) -> DeltaSink:
    def sink(delta: Delta) -> bool:  # the scheduler thread, between two decodes
        return write(encode(delta.text)) if delta.text else True

    return sink


def sampling_params(
    body: Any, grammar: Any, default_seeds: Callable[[str], int | None], random_seed: Callable[[], int]
) -> SamplingParams:
    """A request's sampler settings (chat, completions, responses: the same fields): its seed, else the
    model's configured one, else a fresh random one."""
    seed = body.seed
    if seed is None or seed == -1:
        seed = default_seeds(body.model)
        if seed is None:
            seed = random_seed()
    return SamplingParams.with_overrides(
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        repeat_last_n=body.repeat_last_n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=seed & 0xFFFFFFFF,
        logit_bias=body.biases,
        grammar=grammar,
    )
