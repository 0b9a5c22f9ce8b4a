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

__all__ = ["Message", "text_tokens", "token_ids", "chat_tokens", "content_tokens", "token_pieces"]


class Message(TypedDict, total=False):
    """One chat message as templates take it (role, content and an optional name)."""

    role: str
    content: str
    name: str


def text_tokens(model: LlamaModel, text: str) -> list[int]:
    """A completion's prompt: BOS (where the model adds one) and the text, special tokens parsed."""
    return _tokenize(model, text, add_special=True, parse_special=True)


def token_ids(model: LlamaModel, ids: Sequence[int]) -> list[int]:
    """A prompt given as token ids, as they are: only checked against the vocabulary."""
    if any(not 0 <= t < model.n_vocab for t in ids):
        raise InvalidPrompt("token ids must be within the model's vocabulary")
    return list(ids)


def content_tokens(model: LlamaModel, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    """Text as the model's tokens, no template and no BOS rule: BOS only where `add_special` asks for
    it (llama-server's /tokenize)."""
    return _tokenize(model, text, add_special=add_special, parse_special=parse_special)


def token_pieces(model: LlamaModel, ids: Sequence[int]) -> list[bytes]:
    """Each token's bytes, control tokens spelt out (llama-server's /tokenize pieces and /detokenize);
    every id is checked against the vocabulary first."""
    return [model.shown_piece(t) for t in token_ids(model, ids)]


def chat_tokens(model: LlamaModel, template: ChatTemplate | None, messages: list[Message], *, model_name: str) -> list[int]:
    """Render the messages with the model's template, then tokenize; BOS is added only where the
    rendered text does not already start with it (templates that write `bos_token` themselves)."""
    bos_text = model.token_text(model.bos) if model.bos >= 0 else None
    try:
        text = render_chat(
            template,
            [dict(m) for m in messages],
            model_name=model_name,
            bos_token=bos_text or "",
            eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
        )
    except UnicodeEncodeError:  # a built-in template hands the messages to llama.cpp as UTF-8
        raise InvalidPrompt(_NOT_UTF8) from None
    add_bos = not (bos_text and text.startswith(bos_text))
    return _tokenize(model, text, add_special=add_bos, parse_special=True)


# JSON can spell a lone surrogate (\ud800), which Python's parser keeps in the string; UTF-8 cannot.
_NOT_UTF8 = "text must be valid Unicode: a lone surrogate (\\ud800-\\udfff) has no UTF-8 form"


def _tokenize(model: LlamaModel, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    try:
        return model.tokenize(text, add_special=add_special, parse_special=parse_special)
    except UnicodeEncodeError:
        raise InvalidPrompt(_NOT_UTF8) from None
