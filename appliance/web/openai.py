"""The OpenAI wire format of completions and chat: response objects, stream chunks and SSE framing.

Everything here is pure: engine events in, JSON objects or SSE bytes out. The resources decide what
to run (web/resources/inference.py); the stream machinery decides where bytes go (web/streams.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps uses
from typing import Any, Literal

from appliance.engine.events import Delta, Done, Failed, TokenLogprob
from appliance.web.errors import ApiError, PromptParam, from_engine
from attestation.signing import SSE_DONE

__all__ = [
    "Exchange", "Choice", "sse_event", "text_chunk_encoder", "final_object", "chunks", "usage", "timings", "SSE_DONE",
    "ToolReply", "tool_reply", "ResponseText", "tool_call_chunks",
]

Json = dict[str, Any]
Kind = Literal["completion", "chat"]


@dataclass(frozen=True)
class Exchange:
    """What the wire format needs to know about one request besides the engine's events."""

    kind: Kind
    id: str
    created: int
    model: str
    logprobs: bool
    """Whether logprobs were asked for (they are then in every chunk and in the final object)."""
    include_usage: bool = False
    """stream_options.include_usage: a separate usage chunk before [DONE]."""
    text_offset: int = 0
    """OpenAI counts a completion's text_offset from the start of the prompt, across chunks."""
    n: int = 1
    """Choices: each chunk carries one choice's `index`; usage comes once, over them all."""
    echo: str = ""
    """A completion's prompt text, echoed before each choice's text (`echo`)."""
    call_id: Callable[[], str] | None = None
    """Set when the request calls tools: a new tool call's id. Each choice's text is then the
    generic format's JSON reply, answered as tool calls or as content (`tool_reply`)."""

    @property
    def prompt_param(self) -> PromptParam:
        return "messages" if self.kind == "chat" else "prompt"


def sse_event(obj: Json) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def text_chunk_encoder(base: Json, *, chat: bool, index: int = 0) -> Callable[[str], bytes]:
    """f(text) -> the SSE event of a token chunk without logprobs, byte for byte what sse_event gives
    for the whole object, from a template: only the text is encoded per token (the event loop's turn
    for each token sits on the decode's critical path)."""
    marker = "\x00appliance-text\x00"
    choice = (
        {"index": index, "delta": {"content": marker}, "logprobs": None, "finish_reason": None}
        if chat
        else {"index": index, "text": marker, "logprobs": None, "finish_reason": None}
    )
    head, tail = sse_event({**base, "choices": [choice]}).split(json.dumps(marker).encode())

    def encode(text: str) -> bytes:
        # What json.dumps(text, ensure_ascii=False) returns, without building a JSONEncoder per call
        # (this runs between two decodes, cache-cold: every call and object counts).
        encoded: str = _json_string(text)
        return head + encoded.encode() + tail

    return encode


def _base(x: Exchange, obj: str) -> Json:
    return {"id": x.id, "object": obj, "created": x.created, "model": x.model, "system_fingerprint": None}


@dataclass(frozen=True)
class Choice:
    """One choice of a finished request: its text, its tokens' logprobs and how it ended."""

    text: str
    logprobs: list[TokenLogprob]
    done: Done


def final_object(x: Exchange, choices: list[Choice]) -> Json:
    """The whole answer of a request that did not stream: its choices in index order, usage over all
    (the prompt counted once)."""
    out: list[Json] = []
    for c in sorted(choices, key=lambda c: c.done.index):
        lps = c.logprobs
        if x.kind == "completion":
            out.append({
                "index": c.done.index,
                "text": x.echo + c.text,
                "logprobs": completion_logprobs(lps, x.text_offset) if x.logprobs else None,
                "finish_reason": c.done.finish_reason,
            })
        elif x.call_id is not None:
            reply = tool_reply(c.text, c.done.finish_reason, x.call_id)
            message: Json = {"role": "assistant", "content": reply.content}
            if reply.tool_calls is not None:
                message["tool_calls"] = reply.tool_calls
            out.append({
                "index": c.done.index,
                "message": message,
                "logprobs": {"content": [chat_logprob(lp) for lp in lps]} if x.logprobs else None,
                "finish_reason": reply.finish_reason,
            })
        else:
            out.append({
                "index": c.done.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": [chat_logprob(lp) for lp in lps]} if x.logprobs else None,
                "finish_reason": c.done.finish_reason,
            })
    total = Done.merged([c.done for c in choices])
    if x.call_id is not None and out and out[-1]["finish_reason"] == "tool_calls":
        total = replace(total, finish_reason="tool_calls")
    obj = "text_completion" if x.kind == "completion" else "chat.completion"
    return {**_base(x, obj), "choices": out, "usage": usage(total), "timings": timings(total)}


def chunk_base(x: Exchange) -> Json:
    """The fields every chunk of this stream carries."""
    return _base(x, "chat.completion.chunk" if x.kind == "chat" else "text_completion")


def opening_chunk(x: Exchange) -> bytes | None:
    """A chat stream opens with the assistant's role (and empty content, unless the reply may be tool
    calls), for each choice; a completion stream has no
    opening chunk, unless it echoes its prompt (then one per choice, the prompt as its text)."""
    if x.kind != "chat":
        if not x.echo:
            return None
        return b"".join(
            sse_event({**chunk_base(x), "choices": [{"index": i, "text": x.echo, "logprobs": None, "finish_reason": None}]})
            for i in range(x.n)
        )
    # A reply that may be tool calls opens without content: the SDK's accumulator keeps it null then.
    delta: Json = {"role": "assistant"} if x.call_id is not None else {"role": "assistant", "content": ""}
    return b"".join(
        sse_event({**chunk_base(x), "choices": [
            {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
        ]})
        for i in range(x.n)
    )


def chunks(
    x: Exchange, event: Delta | Done | Failed, text_chunk: Callable[[str], bytes], offset: int, *, last: bool = True
) -> tuple[list[bytes], int]:
    """The SSE events for one engine event, and the completion's text offset after them.

    `text_chunk` encodes the event's choice; a Done that is not the `last` of the request's choices is
    only its choice's finish chunk, and the last one's Done must be the request's totals (Done.merged)."""
    if isinstance(event, Delta):
        if not event.text and not event.logprobs:
            return [], offset
        if not x.logprobs:
            return [text_chunk(event.text)], offset
    chat = x.kind == "chat"
    base = chunk_base(x)
    if isinstance(event, Delta):
        if chat:
            lp: Json = {"content": [chat_logprob(t) for t in event.logprobs]}
            choice: Json = {"index": event.index, "delta": {"content": event.text}, "logprobs": lp, "finish_reason": None}
            return [sse_event({**base, "choices": [choice]})], offset
        lp = completion_logprobs(list(event.logprobs), offset)
        offset += sum(len(t.token) for t in event.logprobs)
        choice = {"index": event.index, "text": event.text, "logprobs": lp, "finish_reason": None}
        return [sse_event({**base, "choices": [choice]})], offset
    if isinstance(event, Done):
        end: Json = {"index": event.index, "logprobs": None, "finish_reason": event.finish_reason}
        if chat:
            end["delta"] = {}
        else:
            end["text"] = ""
        if not last:
            return [sse_event({**base, "choices": [end]})], offset
        usage_inline = None if x.include_usage else usage(event)
        out = [sse_event({**base, "choices": [end], "usage": usage_inline, "timings": timings(event)})]
        if x.include_usage:
            out.append(sse_event({**base, "choices": [], "usage": usage(event)}))
        out.append(SSE_DONE)
        return out, offset
    return [error_event(from_engine(event.error, prompt_param=x.prompt_param))], offset


def error_event(err: ApiError) -> bytes:
    return sse_event(err.body())


def usage(done: Done) -> Json:
    u = done.usage
    out: Json = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }
    if u.prediction is not None:
        out["completion_tokens_details"] = {"accepted_prediction_tokens": u.prediction.accepted,
                                            "rejected_prediction_tokens": u.prediction.rejected}
    return out


def timings(done: Done) -> Json:
    t = done.timings
    out: Json = {
        "prompt_n": t.prompt_n,
        "prompt_ms": round(t.prompt_ms, 3),
        "prompt_per_second": round(t.prompt_per_second, 3),
        "predicted_n": t.predicted_n,
        "predicted_ms": round(t.predicted_ms, 3),
        "predicted_per_second": round(t.predicted_per_second, 3),
        "queued_ms": round(t.queued_ms, 3),
    }
    if (p := done.usage.prediction) is not None:
        out["draft_n"], out["draft_n_accepted"] = p.drafted, p.draft_kept
    return out


def completion_logprobs(lps: list[TokenLogprob], start: int) -> Json:
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


def chat_logprob(lp: TokenLogprob) -> Json:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(b)} for t, b, v in lp.top],
    }


# ---------------------------------------------------------------------------------------------
# Tool calls (the generic format: the grammar holds the reply to one JSON object)


@dataclass(frozen=True)
class ToolReply:
    """A choice's reply as the wire has it: content, or tool calls (content null), and why it ended."""

    content: str | None
    tool_calls: list[Json] | None
    finish_reason: str


def tool_reply(text: str, finish_reason: str, call_id: Callable[[], str]) -> ToolReply:
    """A constrained reply read: `{"tool_calls": [...]}` becomes tool calls (finish_reason
    `tool_calls`, each call a new id and its arguments as a JSON string), `{"response": text}` the
    content. A reply cut short (`length`, or a stop string inside the JSON) is not JSON: it is
    returned as it is, as content, with the finish reason the generation had."""
    try:
        reply = json.loads(text)
    except ValueError:
        return ToolReply(text, None, finish_reason)
    if isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list):
        calls = [
            {"id": call_id(), "type": "function", "function": {
                "name": str(c.get("name")),
                "arguments": json.dumps(c.get("arguments"), ensure_ascii=False, separators=(",", ":")),
            }}
            for c in reply["tool_calls"] if isinstance(c, dict)
        ]
        if calls:
            return ToolReply(None, calls, "tool_calls")
    if isinstance(reply, dict) and isinstance(reply.get("response"), str):
        return ToolReply(reply["response"], None, finish_reason)
    return ToolReply(text, None, finish_reason)


def tool_call_chunks(x: Exchange, calls: list[Json], index: int = 0) -> list[bytes]:
    """A reply's tool calls as stream chunks, in OpenAI's shape: per call, one chunk opening it (its
    index, id, type, function name and empty arguments), then one with its arguments."""
    base = chunk_base(x)
    out: list[bytes] = []
    for i, call in enumerate(calls):
        f = call["function"]
        opening = {"index": i, "id": call["id"], "type": "function", "function": {"name": f["name"], "arguments": ""}}
        for delta in (opening, {"index": i, "function": {"arguments": f["arguments"]}}):
            out.append(sse_event({**base, "choices": [
                {"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None, "finish_reason": None}
            ]}))
    return out


_RESPONSE_OPENING = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_FIRST_KEY = re.compile(r'\s*\{\s*"(.)')
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class ResponseText:
    """Reads a generic-format reply as it is decoded, for streaming: once it is known to be
    `{"response": "..."}`, the string's text comes out as it arrives (escapes decoded; an escape
    cut in two waits for its end; a surrogate pair waits for its second half); while it could
    still be tool calls, nothing does. `feed` returns the new text; `text` is all that was fed."""

    def __init__(self) -> None:
        self._raw: list[str] = []
        self._kind: Literal["unknown", "response", "calls"] = "unknown"
        self._pos = 0  # where in the raw text the string's undecoded rest starts
        self._closed = False

    @property
    def text(self) -> str:
        return "".join(self._raw)

    @property
    def streaming(self) -> bool:
        """Whether the reply is a response whose text is being streamed."""
        return self._kind == "response"

    def feed(self, piece: str) -> str:
        self._raw.append(piece)
        if self._kind == "calls" or self._closed:
            return ""
        raw = self.text
        if self._kind == "unknown":
            m = _RESPONSE_OPENING.match(raw)
            if m is not None:
                self._kind, self._pos = "response", m.end()
            else:
                key = _FIRST_KEY.match(raw)
                if key is not None and key.group(1) != "r":
                    self._kind = "calls"  # (or not the generic format at all: read at the end)
                return ""
        return self._decode(raw)

    def _decode(self, raw: str) -> str:
        out: list[str] = []
        pos, n = self._pos, len(raw)
        while pos < n:
            c = raw[pos]
            if c == '"':
                self._closed = True
                pos += 1
                break
            if c != "\\":
                out.append(c)
                pos += 1
                continue
            if pos + 1 >= n:
                break  # the escape's end is still to come
            e = raw[pos + 1]
            if e != "u":
                out.append(_ESCAPES.get(e, e))
                pos += 2
                continue
            if pos + 6 > n:
                break
            code = int(raw[pos + 2 : pos + 6], 16)
            if 0xD800 <= code < 0xDC00:  # a high surrogate: its low half follows as another escape
                if pos + 12 > n:
                    break
                low = int(raw[pos + 8 : pos + 12], 16) if raw[pos + 6 : pos + 8] == "\\u" else -1
                if 0xDC00 <= low < 0xE000:
                    out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                    pos += 12
                    continue
                out.append("\ufffd")
                pos += 6
                continue
            out.append(chr(code) if not 0xDC00 <= code < 0xE000 else "\ufffd")
            pos += 6
        self._pos = pos
        return "".join(out)
