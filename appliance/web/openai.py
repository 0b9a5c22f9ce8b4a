"""The OpenAI wire format of completions and chat: response objects, stream chunks and SSE framing.

Everything here is pure: engine events in, JSON objects or SSE bytes out. The resources decide what
to run (web/resources/inference.py); the stream machinery decides where bytes go (web/streams.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as _json_string  # the C encoder json.dumps uses
from typing import Any, Literal

from appliance.engine.events import Delta, Done, Failed, TokenLogprob
from appliance.web.errors import ApiError, PromptParam, from_engine
from attestation.signing import SSE_DONE

__all__ = [
    "Exchange", "Choice", "sse_event", "text_chunk_encoder", "final_object", "chunks", "usage", "timings", "SSE_DONE",
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
        else:
            out.append({
                "index": c.done.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": {"content": [chat_logprob(lp) for lp in lps]} if x.logprobs else None,
                "finish_reason": c.done.finish_reason,
            })
    total = Done.merged([c.done for c in choices])
    obj = "text_completion" if x.kind == "completion" else "chat.completion"
    return {**_base(x, obj), "choices": out, "usage": usage(total), "timings": timings(total)}


def chunk_base(x: Exchange) -> Json:
    """The fields every chunk of this stream carries."""
    return _base(x, "chat.completion.chunk" if x.kind == "chat" else "text_completion")


def opening_chunk(x: Exchange) -> bytes | None:
    """A chat stream opens with the assistant's role, for each choice; a completion stream has no
    opening chunk, unless it echoes its prompt (then one per choice, the prompt as its text)."""
    if x.kind != "chat":
        if not x.echo:
            return None
        return b"".join(
            sse_event({**chunk_base(x), "choices": [{"index": i, "text": x.echo, "logprobs": None, "finish_reason": None}]})
            for i in range(x.n)
        )
    return b"".join(
        sse_event({**chunk_base(x), "choices": [
            {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
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
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def timings(done: Done) -> Json:
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
