"""The wire format of the Responses and Conversations APIs: items, response objects, lists, stream events.

Pure, like web/openai.py: values in, JSON objects or SSE bytes out. The shapes are OpenAI's, as the
official SDK's models (`openai.types.responses`, `openai.types.conversations`) read them. What the
server adds is under `x_appliance` (a field the SDK keeps as an extra): `pruned_items`, how many of
the oldest history items were left out of this response's prompt to fit the model's context.

Items are messages, function calls (`function_call`, what the model called) and their results
(`function_call_output`, what the client sends back). For the chat template they become chat messages
(`chat_messages`): consecutive calls one assistant message with `tool_calls` (after the assistant's
text, if a message of it came just before), each result a `tool` message, as on the chat route. A
reply that calls tools is read by the chat route's reader (`openai.tool_reply`, `tool_output` here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.engine.events import Done
from appliance.engine.prompt import Message
from appliance.web.openai import ResponseText, ToolReply, sse_event, tool_reply

__all__ = [
    "Json", "message_item", "function_call_item", "function_call_output_item", "item_role", "item_text",
    "chat_message", "chat_messages", "unanswered_output", "tool_output", "ResponseDraft", "usage", "EventWriter",
    "list_page", "conversation_object", "PageError",
]

Json = dict[str, Any]
Role = Literal["user", "assistant", "system", "developer"]


def message_item(item_id: str, role: str, text: str, *, status: str = "completed") -> Json:
    """A message item as stored and shown: user, system and developer text is `input_text`, an
    assistant's is `output_text` (the shape of a response's output message)."""
    if role == "assistant":
        part: Json = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    else:
        part = {"type": "input_text", "text": text}
    return {"id": item_id, "type": "message", "status": status, "role": role, "content": [part]}


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, *, status: str = "completed") -> Json:
    """A function call the model made, as a response's output (and the history) holds it: `arguments`
    a JSON string."""
    return {"id": item_id, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def function_call_output_item(item_id: str, call_id: str, output: str | list[Json]) -> Json:
    """A function's result, as the client sent it (text, or input_text parts)."""
    return {"id": item_id, "type": "function_call_output", "status": "completed", "call_id": call_id, "output": output}


def item_role(item: Json) -> str:
    return str(item["role"])


def item_text(item: Json) -> str:
    return "".join(str(p.get("text", "")) for p in item.get("content", []))


def chat_message(item: Json) -> dict[str, str]:
    """A stored message item as the chat template takes it."""
    return {"role": item_role(item), "content": item_text(item)}


def _output_text(item: Json) -> str:
    output = item.get("output")
    if isinstance(output, str):
        return output
    return "".join(str(p.get("text", "")) for p in output or [])


def chat_messages(items: Iterable[Json]) -> list[Message]:
    """Stored items as the chat template takes them (the module's docstring says how function calls and
    their results become messages, as the chat route has them)."""
    out: list[Message] = []
    calling = False  # whether the last message is an assistant's that function calls may join
    for item in items:
        kind = item.get("type", "message")
        if kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            if calling:
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            calling = True
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": _output_text(item)})
            calling = False
        else:
            m = chat_message(item)
            out.append({"role": m["role"], "content": m["content"]})
            calling = m["role"] == "assistant"
    return out


def unanswered_output(history: Iterable[Json], given: Iterable[Json]) -> str | None:
    """The call id of the first function_call_output among the new items (`given`) that answers no
    function_call before it (in the history or earlier in `given`), or None. Stored history is taken as
    it is: only what a request adds is checked."""
    calls = {it.get("call_id") for it in history if it.get("type") == "function_call"}
    for it in given:
        if it.get("type") == "function_call":
            calls.add(it["call_id"])
        elif it.get("type") == "function_call_output" and it["call_id"] not in calls:
            return str(it["call_id"])
    return None


def tool_output(text: str, finish_reason: str, call_id: Callable[[], str]) -> ToolReply:
    """A reply to a request that calls tools, read as the chat route reads it (`openai.tool_reply`):
    tool calls, or the text of `{"response": ...}`. A text reply cut short (by max_output_tokens or a
    stop string) is its text so far, exactly what a stream sent of it, rather than the chat route's raw
    JSON fragment; any other reply that did not complete is its raw text."""
    reply = tool_reply(text, finish_reason, call_id)
    if reply.tool_calls is None and reply.content == text:
        reader = ResponseText()
        partial = reader.feed(text)
        if reader.streaming:
            return ToolReply(partial, None, finish_reason)
    return reply


def usage(done: Done) -> Json:
    u = done.usage
    return {
        "input_tokens": u.prompt_tokens,
        # Written to the cache: what this request decoded into its slot's KV cache, which the next turn
        # of the same history can reuse (prefix reuse), where OpenAI's prompt cache would keep it.
        "input_tokens_details": {"cached_tokens": u.cached_tokens,
                                 "cache_write_tokens": u.prompt_tokens - u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


@dataclass
class ResponseDraft:
    """A response object being built: what the request asked for, then what generation gave."""

    id: str
    created_at: int
    model: str
    instructions: str | None
    previous_response_id: str | None
    conversation_id: str | None
    store: bool
    max_output_tokens: int | None
    temperature: float
    top_p: float
    truncation: str
    text_format: Json
    metadata: dict[str, str]
    tool_choice: str | dict[str, str]
    parallel_tool_calls: bool
    tools: list[Json] = field(default_factory=list)
    max_tool_calls: int | None = None
    pruned_items: int = 0
    status: str = "in_progress"
    output: list[Json] = field(default_factory=list)
    usage: Json | None = None
    completed_at: int | None = None
    incomplete_reason: str | None = None

    def finish(self, items: list[Json], done: Done, now: int) -> None:
        """Generation ended (`done`), its output `items` built (a message, or function calls): a
        length finish is `incomplete`."""
        self.output = list(items)
        self.usage = usage(done)
        self.completed_at = now
        if done.finish_reason == "length":
            self.status = "incomplete"
            self.incomplete_reason = "max_output_tokens"
        else:
            self.status = "completed"

    def to_json(self) -> Json:
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "background": False,
            "completed_at": self.completed_at,
            "error": None,
            "incomplete_details": {"reason": self.incomplete_reason} if self.incomplete_reason else None,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "max_tool_calls": self.max_tool_calls,
            "model": self.model,
            "output": list(self.output),
            "parallel_tool_calls": self.parallel_tool_calls,
            "previous_response_id": self.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": self.store,
            "temperature": self.temperature,
            "text": {"format": self.text_format, "verbosity": "medium"},
            "tool_choice": self.tool_choice,
            "tools": [dict(t) for t in self.tools],
            "top_logprobs": 0,
            "top_p": self.top_p,
            "truncation": self.truncation,
            "usage": self.usage,
            "user": None,
            "metadata": dict(self.metadata),
            "conversation": {"id": self.conversation_id} if self.conversation_id else None,
            "x_appliance": {"pruned_items": self.pruned_items},
        }


class EventWriter:
    """The typed events of a response stream, numbered from 0 (`sequence_number`)."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse_event(event)

    def delta(self, item_id: str, text: str) -> bytes:
        return self("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=text,
                    logprobs=[])


class PageError(ValueError):
    """A list request that cannot be answered: `param` names the query parameter."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def list_page(items: Sequence[Json], *, order: str, limit: int, after: str | None) -> Json:
    """OpenAI's cursor list: `order` asc (oldest first) or desc, at most `limit` items after the item
    `after` (in that order)."""
    seq = list(items) if order == "asc" else list(reversed(items))
    start = 0
    if after is not None:
        ids = [it["id"] for it in seq]
        if after not in ids:
            raise PageError(f"after: no item with id '{after[:80]}' in this list", "after")
        start = ids.index(after) + 1
    chunk = seq[start : start + limit]
    return {
        "object": "list",
        "data": chunk,
        "first_id": chunk[0]["id"] if chunk else None,
        "last_id": chunk[-1]["id"] if chunk else None,
        "has_more": start + limit < len(seq),
    }


def conversation_object(record: Json) -> Json:
    return {"id": record["id"], "object": "conversation", "created_at": record["created_at"],
            "metadata": dict(record.get("metadata") or {})}
