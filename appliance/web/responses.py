"""The wire format of the Responses and Conversations APIs: items, response objects, lists, stream events.

Pure, like web/openai.py: values in, JSON objects or SSE bytes out. The shapes are OpenAI's, as the
official SDK's models (`openai.types.responses`, `openai.types.conversations`) read them. What the
server adds is under `x_appliance` (a field the SDK keeps as an extra): `pruned_items`, how many of
the oldest history items were left out of this response's prompt to fit the model's context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.engine.events import Done
from appliance.web.openai import sse_event

__all__ = [
    "Json", "message_item", "item_role", "item_text", "chat_message", "ResponseDraft", "usage", "EventWriter",
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


def item_role(item: Json) -> str:
    return str(item["role"])


def item_text(item: Json) -> str:
    return "".join(str(p.get("text", "")) for p in item.get("content", []))


def chat_message(item: Json) -> dict[str, str]:
    """A stored message item as the chat template takes it."""
    return {"role": item_role(item), "content": item_text(item)}


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
    tool_choice: str
    parallel_tool_calls: bool
    pruned_items: int = 0
    status: str = "in_progress"
    output: list[Json] = field(default_factory=list)
    usage: Json | None = None
    completed_at: int | None = None
    incomplete_reason: str | None = None

    def finish(self, item: Json, done: Done, now: int) -> None:
        """Generation ended (`done`), its message `item` built: a length finish is `incomplete`."""
        self.output = [item]
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
            "max_tool_calls": None,
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
            "tools": [],
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
