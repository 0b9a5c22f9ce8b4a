"""Text or messages to prompt tokens: the chat template, the BOS rule and tokenizing, in one place.

Every function here calls llama.cpp (tokenizing, or a built-in template) and so runs on a pool thread,
never on the event loop: the registry's `text_prompt` / `chat_prompt` hand them to `off_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

from appliance.engine.chat import ChatTemplate, render_chat
from appliance.engine.errors import InvalidPrompt
from appliance.engine.llama import LlamaModel

__all__ = ["Message", "text_tokens", "token_ids", "chat_tokens"]


class Message(TypedDict, total=False):
    """One chat message as templates take it (role, content and an optional name)."""

    role: str
    content: str
    name: str


def text_tokens(model: LlamaModel, text: str) -> list[int]:
    """A completion's prompt: BOS (where the model adds one) and the text, special tokens parsed."""
    return model.tokenize(text, add_special=True, parse_special=True)


def token_ids(model: LlamaModel, ids: Sequence[int]) -> list[int]:
    """A prompt given as token ids, as they are: only checked against the vocabulary."""
    if any(not 0 <= t < model.n_vocab for t in ids):
        raise InvalidPrompt("token ids must be within the model's vocabulary")
    return list(ids)


def chat_tokens(model: LlamaModel, template: ChatTemplate | None, messages: list[Message], *, model_name: str) -> list[int]:
    """Render the messages with the model's template, then tokenize; BOS is added only where the
    rendered text does not already start with it (templates that write `bos_token` themselves)."""
    bos_text = model.token_text(model.bos) if model.bos >= 0 else None
    text = render_chat(
        template,
        [dict(m) for m in messages],
        model_name=model_name,
        bos_token=bos_text or "",
        eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
    )
    add_bos = not (bos_text and text.startswith(bos_text))
    return model.tokenize(text, add_special=add_bos, parse_special=True)
