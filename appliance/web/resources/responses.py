"""OpenAI's Responses API: POST /v1/responses (JSON or typed SSE events), and the stored responses.

A response is generated on the chat path: the model's chat template applied to the instructions (as a
system message), the history, and the new input. The history is the previous response's input and
output (`previous_response_id`), or a conversation's items (`conversation`), read from the sealed store
(appliance/conversations) as the calling key: another key's ids answer 404, exactly like unknown ones.

Context policy (`truncation`, default `auto` here): when the prompt would leave the answer less than
min(max_output_tokens, or a quarter of the context, and at most half of it) of the model's context
per request (or exceeds `limits.max_prompt_tokens`), the oldest turns of the history are left out, a
turn being a user message and what follows it up to the next one; system and developer messages of
the history, the instructions and the new input are always kept. How many items were left out is the
response's `x_appliance.pruned_items`, and the stored input (`input_items`) is what the model saw, so a
chain continues from the pruned history. `truncation: "disabled"` sends everything (a prompt that does
not fit is a 400 `context_length_exceeded`), as OpenAI's default does.

Stored (`store`, default true) is the response and its input once generation ends; a stream cut
short, a failure, or `store: false` stores nothing (a conversation still gets a finished exchange
appended). /v1/chat/completions stays stateless: nothing here touches it.

Function tools take the chat route's path (web/resources/inference.py): the same prompt (the tool
instruction, engine/chat.py), the same grammar (engine/grammar.py `tool_calls_schema`) and the same
reader of the reply (web/responses.py `tool_output`). The calls become `function_call` items of the
output (each a new `call_id`); `function_call` and `function_call_output` items of the input and
history are rendered as the chat route renders an assistant's tool calls and `tool` messages. A
`function_call_output` the request sends must answer a `function_call` before it (in the history or
its own input): else a 400 naming `input`, as OpenAI answers. Streamed, a text reply's text arrives as
it is decoded; function calls arrive at the end, once the reply is complete (each call's item added,
its arguments in one delta, done).

Every response carries the running hash of its chain (spec/signing.md §6): `prev` (the head of the
conversation, or of the previous response, before this turn; for a response that starts a chain, the
genesis of its own id) and `head` = H(prev, this request's body, this response's bytes), in the signed
`Appliance-Conversation` header (JSON) or the signed final line (streams). Heads are kept in the sealed
records, so the next turn continues from them; a conversation's head moves in the same update that
appends the exchange to it.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import falcon

from appliance.conversations import ConversationStore, RecordNotFound, RecordTooLarge
from appliance.engine.chat import ToolPrompt
from appliance.engine.errors import InvalidGrammar
from appliance.engine.events import Delta, Done, Failed, GenerationRequest
from appliance.engine.grammar import tool_calls_schema
from appliance.engine.llama import Grammar, SamplingParams
from appliance.engine.mailbox import Generation
from appliance.engine.prompt import Message, chat_tokens
from appliance.engine.registry import ModelRegistry
from appliance.engine.scheduler import ModelEngine
from appliance.osthreads import off_loop
from appliance.settings import ConversationSettings, LimitsSettings
from appliance.web import openai, websocket
from appliance.web.errors import (
    ApiError,
    BadRequest,
    ClientClosedRequest,
    InternalError,
    NotFound,
    UpgradeRequired,
    from_engine,
    from_store,
    to_api_error,
)
from appliance.web.middleware import request_info
from appliance.web.resources.inference import sampling_params
from appliance.web.responses import (
    EventWriter,
    Json,
    PageError,
    ResponseDraft,
    chat_messages,
    function_call_item,
    function_call_output_item,
    list_page,
    message_item,
    tool_output,
    unanswered_output,
)
from appliance.web.schemas import (
    FunctionCallInput,
    FunctionCallOutputInput,
    InputItem,
    InputMessage,
    ResponseRequest,
    ToolUse,
    parse,
)
from appliance.web.state import AppState
from appliance.web.streams import GenerationStream, StreamOutcome, finish, watch_disconnect
from attestation.signing import (
    CONVERSATION_HEADER,
    STREAM_HEADER,
    WS_SCHEME,
    b64,
    conversation_genesis,
    conversation_header,
    conversation_turn,
)

__all__ = ["Responses", "StoredResponses", "InputItems", "owner_of", "list_params", "page", "new_items"]

log = logging.getLogger("appliance.http")

_LIMIT = re.compile(r"^[0-9]{1,6}$")


def owner_of(req: falcon.Request) -> str:
    """Whose records these are: the authenticated key's name (an API key's configured name, a client
    key's id: stable, never secret); "" on a server without keys, where whoever holds an id may use it."""
    principal = getattr(req.context, "principal", None)
    return principal if isinstance(principal, str) else ""


def list_params(req: falcon.Request) -> tuple[str, int, str | None]:
    """`order` (asc|desc, default desc), `limit` (1-100, default 20), `after` (an item id)."""
    order = req.get_param("order")
    if order is None:
        order = "desc"
    elif order not in ("asc", "desc"):
        raise BadRequest("order: asc or desc", param="order")
    raw = req.get_param("limit")
    limit = 20
    if raw is not None:
        if not _LIMIT.match(raw) or not 1 <= int(raw) <= 100:
            raise BadRequest("limit: an integer from 1 to 100", param="limit")
        limit = int(raw)
    return order, limit, req.get_param("after")


def page(items: list[Json], req: falcon.Request) -> Json:
    order, limit, after = list_params(req)
    try:
        return list_page(items, order=order, limit=limit, after=after)
    except PageError as e:  # a cursor naming no item of the list: not found, like any other unknown id
        raise NotFound(e.message, param=e.param) from None


def new_items(store: ConversationStore, given: list[InputItem]) -> list[Json]:
    """Request items as stored items, each with a fresh id."""
    out: list[Json] = []
    for it in given:
        if isinstance(it, FunctionCallInput):
            out.append(function_call_item(store.new_id("fc"), it.call_id, it.name, it.arguments))
        elif isinstance(it, FunctionCallOutputInput):
            output = it.output if isinstance(it.output, str) else [p.model_dump() for p in it.output]
            out.append(function_call_output_item(store.new_id("fco"), it.call_id, output))
        else:
            out.append(message_item(store.new_id("msg"), it.role, it.text()))
    return out


class StoredResponses:
    """GET and DELETE /v1/responses/{response_id}. (One resource class per route: the JSON body check
    goes by the class's responders, and a POST here must be a 405, whatever its content type.)"""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        if req.get_param_as_bool("stream"):
            raise BadRequest("stream: a stored response is retrieved whole, not replayed as a stream", param="stream")
        record: Json = self.store.get("response", response_id, owner_of(req))
        obj = record["response"]
        if record.get("head") and record.get("prev"):  # its turn of the chain (spec/signing.md §7)
            obj = {**obj, "x_appliance": {**obj.get("x_appliance", {}),
                                          "chain": {"prev": record["prev"], "head": record["head"]}}}
        resp.media = obj

    def on_delete(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        self.store.delete("response", response_id, owner_of(req))
        resp.media = {"id": response_id, "object": "response", "deleted": True}


class InputItems:
    """GET /v1/responses/{response_id}/input_items: what the model saw, instructions aside."""

    def __init__(self, store: ConversationStore) -> None:
        self.store = store

    def on_get(self, req: falcon.Request, resp: falcon.Response, response_id: str) -> None:
        record: Json = self.store.get("response", response_id, owner_of(req))
        resp.media = page(record["input_items"], req)


class Responses:
    """POST /v1/responses."""

    def __init__(
        self,
        models: ModelRegistry,
        store: ConversationStore,
        limits: LimitsSettings,
        conversations: ConversationSettings,
        *,
        wall_clock: Callable[[], float] = time.time,
        random_seed: Callable[[], int] = lambda: secrets.randbits(32),
        default_seeds: Callable[[str], int | None] = lambda name: None,
        state: AppState | None = None,
    ) -> None:
        self.models = models
        self.store = store
        self.state = state
        """For the WebSocket mode: the identity that signs it, the server settings, whether SIGTERM came."""
        self.limits = limits
        self.max_items = conversations.max_items_per_conversation
        self._wall_clock = wall_clock
        self._random_seed = random_seed
        self._default_seeds = default_seeds

    # -- creating one ------------------------------------------------------------------------

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "input"
        body, exchange, gen = self._begin(req.context.json, req.context.raw_body, owner_of(req))
        watcher = watch_disconnect(req.env.get("gunicorn.socket"), gen)
        if body.stream:
            resp.content_type = "text/event-stream"
            resp.set_header("Cache-Control", "no-store")
            resp.set_header("X-Accel-Buffering", "no")
            outcome = StreamOutcome()
            resp.stream = GenerationStream(self._sse(exchange, gen, outcome), outcome, on_close=lambda: finish(gen, watcher))
            return
        try:
            text, done = self._collect(gen)
        finally:
            finish(gen, watcher)
        items, done = self._output(exchange, text, done)
        _, data = self._finish(exchange, items, done, _json_bytes)
        resp.data = data
        resp.content_type = falcon.MEDIA_JSON
        if exchange.heads is not None:
            resp.set_header(CONVERSATION_HEADER, conversation_header(*exchange.heads))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The WebSocket mode (appliance/web/websocket.py): the same responses, as frames."""
        headers = {k.lower(): v for k, v in req.headers.items()}
        problem = websocket.upgrade_problem(headers)
        if problem is not None:
            raise UpgradeRequired(problem, headers={"Upgrade": "websocket", "Connection": "Upgrade"})
        sock = req.env.get("gunicorn.socket")
        state = self.state
        if sock is None or state is None:
            raise UpgradeRequired("This server cannot take WebSocket connections here (no socket to upgrade)")
        owner = owner_of(req)
        out = {**{k.lower(): v for k, v in resp.headers.items()}, "content-type": "application/json",
               **{k.lower(): v for k, v in websocket.handshake_headers(headers["sec-websocket-key"]).items()},
               STREAM_HEADER: WS_SCHEME}
        info = request_info(req)
        signed = state.identity.sign_response(info, 101, out, None)
        head = "".join(f"{k}: {v}\r\n" for k, v in {**out, **{k.lower(): v for k, v in signed.items()}}.items())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\n" + head.encode("latin-1") + b"\r\n")
        req.env[websocket.UPGRADED] = True
        resp.status = falcon.code_to_http_status(101)
        settings = state.settings

        def start(body: dict[str, Any], raw: bytes) -> websocket.Turn:
            body["stream"] = True
            _, exchange, gen = self._begin(body, raw, owner)
            outcome = StreamOutcome()
            return websocket.Turn(self._sse(exchange, gen, outcome), outcome, lambda: finish(gen, None))

        websocket.Session(
            sock, state.identity, info, signed["Signature"], start,
            max_message=settings.limits.max_body_bytes, idle_timeout=settings.server.websocket_idle_timeout,
            stopping=lambda: state.stopping, rate_limit=getattr(req.context, "rate_limit", None),
        ).run()

    def _begin(self, json_body: Any, raw_body: bytes, owner: str) -> tuple[ResponseRequest, _Exchange, Generation]:
        """Check a request and submit it: the parsed body, the exchange under way, its generation."""
        body = parse(ResponseRequest, json_body)
        history, conversation, prev_head = self._history(body, owner)
        given: list[InputItem] = (
            [InputMessage(role="user", content=body.input)] if isinstance(body.input, str) else list(body.input or [])
        )
        fresh = new_items(self.store, given)
        if not fresh and not history:
            raise BadRequest("input: nothing to respond to (no input, and no history to continue)", param="input")
        unanswered = unanswered_output(history, fresh)
        if unanswered is not None:
            raise BadRequest(f"input: no function_call with call_id '{unanswered[:80]}' comes before its "
                             "function_call_output (in the input or the history it continues)", param="input")
        if conversation is not None and len(history) + len(fresh) + 1 > self.max_items:
            raise BadRequest(
                f"conversation: it holds {len(history)} items; with this exchange it would exceed "
                f"conversations.max_items_per_conversation = {self.max_items}", param="conversation",
            )
        use = body.tool_use()
        engine, prompt, kept, pruned = self._prompt(body, history, fresh, use)
        gen, sampling = self._submit(body, engine, prompt, use)
        draft = ResponseDraft(
            id=self.store.record_id("response"),
            created_at=int(self._wall_clock()),
            model=body.model,
            instructions=body.instructions,
            previous_response_id=body.previous_response_id,
            conversation_id=conversation,
            store=body.store is not False,
            max_output_tokens=body.max_output_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            truncation=body.truncation or "auto",
            text_format=_text_format(body),
            metadata=dict(body.metadata or {}),
            tool_choice=body.tool_choice_shown(),
            parallel_tool_calls=body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            tools=body.tools_shown(),
            max_tool_calls=body.max_tool_calls,
            pruned_items=pruned,
        )
        exchange = _Exchange(owner, draft, kept + fresh, fresh, self.store.new_id("msg"), raw_body,
                             prev_head or conversation_genesis(draft.id), calls_tools=use is not None)
        return body, exchange, gen

    def _history(self, body: ResponseRequest, owner: str) -> tuple[list[Json], str | None, bytes | None]:
        """The items this response continues from, the conversation it belongs to (if any), and the head
        of the previous response's chain (its conversation's head is read when the exchange is added)."""
        if body.previous_response_id is not None:
            try:
                prev: Json = self.store.get("response", body.previous_response_id, owner)
            except RecordNotFound as e:
                raise from_store(e, param="previous_response_id") from None
            head = _head(prev) or conversation_genesis(body.previous_response_id)
            return [*prev["input_items"], *prev["response"]["output"]], None, head
        cid = body.conversation_id
        if cid is not None:
            try:
                conv: Json = self.store.get("conversation", cid, owner)
            except RecordNotFound as e:
                raise from_store(e, param="conversation") from None
            return list(conv["items"]), cid, None
        return [], None, None

    def _prompt(
        self, body: ResponseRequest, history: list[Json], fresh: list[Json], use: ToolUse | None
    ) -> tuple[ModelEngine, list[int], list[Json], int]:
        """The prompt tokens (with the tool instruction where the request calls tools), with the oldest
        history turns left out as the context policy requires (module docstring): (engine, tokens, the
        history kept, how many items were left out)."""
        system: list[Message] = [{"role": "system", "content": body.instructions}] if body.instructions else []
        turns = _turns(history)
        tools = None if use is None else ToolPrompt(use.tools, use.mode == "required", use.function, use.parallel)

        def messages(dropped: int) -> tuple[list[Json], list[Message]]:
            kept = [it for it, turn in zip(history, turns, strict=True) if turn is None or turn >= dropped]
            return kept, [*system, *chat_messages([*kept, *fresh])]

        def tokens(msgs: list[Message]) -> tuple[ModelEngine, list[int]]:
            if tools is None:
                return self.models.chat_prompt(body.model, msgs)
            engine = self.models.get(body.model)  # as the chat route renders a request that calls tools
            return engine, off_loop(chat_tokens, engine.model, self.models.record(body.model).chat_template,
                                    msgs, model_name=body.model, tools=tools)

        kept, msgs = messages(0)
        engine, prompt = tokens(msgs)
        n_turns = max((t for t in turns if t is not None), default=-1) + 1
        if (body.truncation or "auto") == "disabled" or n_turns == 0:
            return engine, prompt, kept, 0
        n_ctx = min(engine.n_ctx, body.n_ctx or engine.n_ctx)
        budget = n_ctx - min(body.max_output_tokens or n_ctx // 4, n_ctx // 2)
        if self.limits.max_prompt_tokens:
            budget = min(budget, self.limits.max_prompt_tokens)
        if len(prompt) <= budget:
            return engine, prompt, kept, 0
        # The fewest turns to leave out (fewer turns, fewer tokens: a binary search over the count).
        lo, hi = 1, n_turns
        best: tuple[int, list[Json], list[int]] | None = None
        while lo <= hi:
            mid = (lo + hi) // 2
            kept, msgs = messages(mid)
            engine, prompt = tokens(msgs)
            if len(prompt) <= budget:
                best, hi = (mid, kept, prompt), mid - 1
            else:
                lo = mid + 1
        if best is None:  # even the new input alone does not leave the answer its room: send that much
            kept, msgs = messages(n_turns)
            engine, prompt = tokens(msgs)
        else:
            _, kept, prompt = best
        return engine, prompt, kept, len(history) - len(kept)

    def _submit(
        self, body: ResponseRequest, engine: ModelEngine, prompt: list[int], use: ToolUse | None
    ) -> tuple[Generation, SamplingParams]:
        """The checks the chat route makes, then the generation (web/resources/inference.py `_run`);
        a request that calls tools is held to the generic format's reply by its grammar."""
        cap = self.limits.max_prompt_tokens
        if cap and len(prompt) > cap:
            raise BadRequest(f"input: the prompt has {len(prompt)} tokens; at most {cap} are allowed", param="input",
                             code="context_length_exceeded")
        stops = body.stops()
        if len(stops) > self.limits.max_stop:
            raise BadRequest(f"stop: at most {self.limits.max_stop} stop strings", param="stop")
        if any(len(s) > self.limits.max_stop_length for s in stops):
            raise BadRequest(f"stop: each stop string is at most {self.limits.max_stop_length} characters", param="stop")
        max_tokens = body.max_output_tokens
        if max_tokens is None:
            max_tokens = self.limits.max_tokens
        elif max_tokens > self.limits.max_tokens:
            raise BadRequest(f"max_output_tokens: at most {self.limits.max_tokens}", param="max_output_tokens")
        if body.n_ctx is not None and body.n_ctx > engine.n_ctx:
            raise BadRequest(f"n_ctx: this model's context per request is at most {engine.n_ctx}", param="n_ctx")
        grammar: Grammar | None = None
        constraint = body.output_constraint()
        if use is not None:  # checked and compiled off the event loop
            schema = tool_calls_schema(use.specs, mode=use.mode, parallel=use.parallel)
            try:
                grammar = self.models.grammar(body.model, schema=schema)
            except InvalidGrammar as e:
                raise from_engine(e, grammar_param="tools") from None
        elif constraint is not None:
            try:
                grammar = self.models.grammar(body.model, gbnf=constraint.gbnf, schema=constraint.schema)
            except InvalidGrammar as e:
                err = from_engine(e, grammar_param="response_format")
                raise BadRequest(err.message.replace("response_format", "text", 1), param="text", code=err.code) from None
        sampling = sampling_params(body, grammar, self._default_seeds, self._random_seed)
        gen = engine.submit(
            GenerationRequest(
                prompt=tuple(prompt),
                max_tokens=max_tokens,
                sampling=sampling,
                stop=stops,
                ignore_eos=bool(body.ignore_eos),
                n_threads=body.n_threads,
                n_ctx=body.n_ctx,
                stream=bool(body.stream),
            )
        )
        return gen, sampling

    # -- answering ---------------------------------------------------------------------------

    def _collect(self, gen: Generation) -> tuple[str, Done]:
        text: list[str] = []
        for ev in gen.events():
            if isinstance(ev, Delta):
                text.append(ev.text)
            elif isinstance(ev, Failed):
                raise from_engine(ev.error, prompt_param="input")
            elif isinstance(ev, Done):
                return "".join(text), ev
        if gen.cancelled:
            raise ClientClosedRequest()
        raise InternalError()

    def _output(self, x: _Exchange, text: str, done: Done) -> tuple[list[Json], Done]:
        """The output items of a finished generation, and `done` with the finish reason they have: the
        assistant's message, or (a request that calls tools) the calls it made, finish `tool_calls`."""
        status = "incomplete" if done.finish_reason == "length" else "completed"
        if not x.calls_tools:
            return [message_item(x.output_id, "assistant", text, status=status)], done
        reply = tool_output(text, done.finish_reason, lambda: self.store.new_id("call"))
        if reply.tool_calls is None:
            return [message_item(x.output_id, "assistant", reply.content or "", status=status)], done
        calls = [function_call_item(self.store.new_id("fc"), c["id"], c["function"]["name"], c["function"]["arguments"])
                 for c in reply.tool_calls]
        return calls, replace(done, finish_reason=reply.finish_reason)

    def _finish(self, x: _Exchange, items: list[Json], done: Done, render: Callable[[Json], bytes]) -> tuple[Json, bytes]:
        """The finished response, its output `items` built (`_output`): its turn added to its chain
        (`render` gives the bytes the client will receive: the JSON body, or the final event's data),
        stored (unless store is false), its exchange appended to its conversation; returns the response
        object and its rendered bytes."""
        x.draft.finish(items, done, int(self._wall_clock()))
        obj = x.draft.to_json()
        data = render(obj)
        x.heads = (x.prev_head, conversation_turn(x.prev_head, x.request_body, data))
        if x.draft.conversation_id is not None:
            added = [*x.fresh, *items]
            cid = x.draft.conversation_id

            def append(conv: Json) -> Json:
                if len(conv["items"]) + len(added) > self.max_items:
                    raise BadRequest(f"conversation: full (conversations.max_items_per_conversation = {self.max_items})",
                                     param="conversation")
                # the conversation's head as it is now (another turn may have moved it since this one began)
                prev = _head(conv) or conversation_genesis(cid)
                x.heads = (prev, conversation_turn(prev, x.request_body, data))
                return {**conv, "items": [*conv["items"], *added], "head": b64(x.heads[1])}

            try:
                self.store.update("conversation", x.draft.conversation_id, x.owner, append)
            except (RecordNotFound, RecordTooLarge) as e:  # deleted (or grown too large) meanwhile
                raise from_store(e, param="conversation") from None
        if x.draft.store:
            try:
                self.store.put("response", x.draft.id, x.owner,
                               {"response": obj, "input_items": x.input_items, "prev": b64(x.heads[0]),
                                "head": b64(x.heads[1])})
            except RecordTooLarge as e:
                raise from_store(e, param="input") from None
        return obj, data

    def _sse(self, x: _Exchange, gen: Generation, outcome: StreamOutcome) -> Iterator[bytes]:
        event = EventWriter()
        started = x.draft.to_json()
        yield event("response.created", response=started)
        yield event("response.in_progress", response=started)
        if x.calls_tools:
            yield from self._sse_tools(x, gen, outcome, event)
            return
        item_id = x.output_id
        yield from _message_opening(event, item_id)
        text: list[str] = []
        try:
            for ev in gen.events():
                if isinstance(ev, Delta):
                    if ev.text:
                        text.append(ev.text)
                        yield event.delta(item_id, ev.text)
                    continue
                if isinstance(ev, Failed):
                    outcome.finish_reason = "error"
                    yield openai.error_event(from_engine(ev.error, prompt_param="input"))
                    return
                full = "".join(text)
                items, done = self._output(x, full, ev)
                yield from self._sse_end(x, event, outcome, items, done, _message_closing(items[0]))
                return
        except Exception as e:
            yield _stream_failed(e, outcome)

    def _sse_tools(self, x: _Exchange, gen: Generation, outcome: StreamOutcome, event: EventWriter) -> Iterator[bytes]:
        """The events of a stream that calls tools (after its opening): a text reply's text as it is
        decoded (the reader of the chat route's streams); function calls, or a reply that did not
        complete (its raw text), at the end."""
        item_id = x.output_id
        reader = openai.ResponseText()
        opened = False
        try:
            for ev in gen.events():
                if isinstance(ev, Delta):
                    streamed = reader.feed(ev.text)
                    if reader.streaming and not opened:
                        opened = True
                        yield from _message_opening(event, item_id)
                    if streamed:
                        yield event.delta(item_id, streamed)
                    continue
                if isinstance(ev, Failed):
                    outcome.finish_reason = "error"
                    yield openai.error_event(from_engine(ev.error, prompt_param="input"))
                    return
                items, done = self._output(x, reader.text, ev)
                closing: list[tuple[str, dict[str, Any]]] = []
                for index, item in enumerate(items):
                    if item["type"] == "message":
                        if not opened:  # a reply that never streamed: its text, in one delta
                            yield from _message_opening(event, item_id)
                            text = item["content"][0]["text"]
                            if text:
                                yield event.delta(item_id, text)
                        closing += _message_closing(item)
                        continue
                    added = {**item, "status": "in_progress", "arguments": ""}
                    closing += [
                        ("response.output_item.added", {"output_index": index, "item": added}),
                        ("response.function_call_arguments.delta",
                         {"item_id": item["id"], "output_index": index, "delta": item["arguments"]}),
                        ("response.function_call_arguments.done",
                         {"item_id": item["id"], "output_index": index, "arguments": item["arguments"]}),
                        ("response.output_item.done", {"output_index": index, "item": item}),
                    ]
                yield from self._sse_end(x, event, outcome, items, done, closing)
                return
        except Exception as e:
            yield _stream_failed(e, outcome)

    def _sse_end(
        self, x: _Exchange, event: EventWriter, outcome: StreamOutcome, items: list[Json], done: Done,
        closing: list[tuple[str, dict[str, Any]]],
    ) -> Iterator[bytes]:
        """The end of a stream: the `closing` events, then the final one, whose bytes the chain's turn
        hashes (so its sequence number is known before the response is finished and stored)."""
        last = event.sequence + len(closing)
        obj, data = self._finish(x, items, done, functools.partial(_final_event, sequence=last))
        outcome.finish_reason = done.finish_reason
        outcome.usage = obj["usage"]
        outcome.conversation = x.heads
        for kind, fields in closing:
            yield event(kind, **fields)
        event.sequence += 1
        yield b"data: " + data + b"\n\n"


@dataclass
class _Exchange:
    """One POST /v1/responses on its way: who asked, the response being built, what the model saw."""

    owner: str
    draft: ResponseDraft
    input_items: list[Json]
    """The history kept and the new input: what the model saw (instructions aside), stored as input_items."""
    fresh: list[Json]
    """The new input only: what a conversation gets appended, with the output."""
    output_id: str
    request_body: bytes
    """The request body as received: the chain's turn hashes it (spec/signing.md §6)."""
    prev_head: bytes
    """The chain's head before this turn (a conversation's is read again when the exchange is appended)."""
    calls_tools: bool = False
    """Whether the request calls tools: its reply is then the generic format's JSON (`_output`)."""
    heads: tuple[bytes, bytes] | None = None
    """(prev, head) once the turn is recorded."""


def _json_bytes(obj: Json) -> bytes:
    """JSON as the appliance sends it (compact, UTF-8): `openai.sse_event`'s encoding."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _final_event(obj: Json, sequence: int) -> bytes:
    """The data of a stream's final event (what the chain's turn hashes, and what is sent)."""
    kind = "response.completed" if obj["status"] == "completed" else "response.incomplete"
    return _json_bytes({"type": kind, "sequence_number": sequence, "response": obj})


def _head(record: Json) -> bytes | None:
    """The chain head a sealed record keeps (records written before heads existed have none)."""
    value = record.get("head")
    return base64.b64decode(value) if isinstance(value, str) else None


def _stream_failed(e: Exception, outcome: StreamOutcome) -> bytes:
    err: ApiError | None = to_api_error(e, prompt_param="input")
    if err is None:
        log.exception("response stream failed")
        err = InternalError()
    outcome.finish_reason = "error"
    return openai.error_event(err)


def _message_opening(event: EventWriter, item_id: str) -> Iterator[bytes]:
    """The events that open the output message, before its text's deltas."""
    yield event("response.output_item.added", output_index=0,
                item={**message_item(item_id, "assistant", "", status="in_progress"), "content": []})
    empty = message_item(item_id, "assistant", "")["content"][0]
    yield event("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=empty)


def _message_closing(item: Json) -> list[tuple[str, dict[str, Any]]]:
    """The events that close the output message (the first output item), after its text's deltas."""
    part = item["content"][0]
    where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
    return [("response.output_text.done", {**where, "text": part["text"], "logprobs": []}),
            ("response.content_part.done", {**where, "part": part}),
            ("response.output_item.done", {"output_index": 0, "item": item})]


def _turns(history: list[Json]) -> list[int | None]:
    """Each history item's turn number (a turn starts at a user message), or None for what is never
    left out (system and developer messages)."""
    out: list[int | None] = []
    turn = -1
    for it in history:
        role = it.get("role")
        if role in ("system", "developer"):
            out.append(None)
            continue
        if role == "user" or turn < 0:
            turn += 1
        out.append(turn)
    return out


def _text_format(body: ResponseRequest) -> dict[str, Any]:
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return {"type": "text"}
    out: dict[str, Any] = {"type": fmt.type}
    if fmt.type == "json_schema":
        out.update({"name": fmt.name or "response", "schema": fmt.schema_ or {}, "strict": bool(fmt.strict),
                    "description": fmt.description})
    return out
