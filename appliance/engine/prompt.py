"""Text or messages to prompt tokens: the chat template, the BOS rule and tokenizing, in one place.

Every function here calls llama.cpp (tokenizing, or a built-in template) and so runs on a pool thread,
never on the event loop: the registry's `text_prompt` / `chat_prompt` hand them to `off_loop`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from appliance.engine.chat import ChatTemplate, ToolPrompt, render_chat
from appliance.engine.errors import InfillNotSupported, InvalidPrompt
from appliance.engine.llama import LlamaModel

__all__ = [
    "Message", "text_tokens", "token_ids", "chat_tokens", "content_tokens", "token_pieces", "FimTokens", "infill_layout",
    "infill_tokens",
]


class Message(TypedDict, total=False):
    """One chat message as templates take it (role, content and an optional name); an assistant's
    tool calls (OpenAI's shape, arguments a JSON string) and a tool result's call id."""

    role: str
    content: str
    name: str
    tool_calls: list[dict[str, Any]]
    tool_call_id: str


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


def chat_tokens(
    model: LlamaModel, template: ChatTemplate | None, messages: list[Message], *, model_name: str,
    tools: ToolPrompt | None = None,
) -> list[int]:
    """Render the messages with the model's template (and, with `tools`, the tool instruction), then
    tokenize; BOS is added only where the rendered text does not already start with it (templates
    that write `bos_token` themselves)."""
    bos_text = model.token_text(model.bos) if model.bos >= 0 else None
    try:
        text = render_chat(
            template,
            [dict(m) for m in messages],
            model_name=model_name,
            bos_token=bos_text or "",
            eos_token=model.token_text(model.eos) if model.eos >= 0 else "",
            tools=tools,
        )
    except UnicodeEncodeError:  # a built-in template hands the messages to llama.cpp as UTF-8
        raise InvalidPrompt(_NOT_UTF8) from None
    add_bos = not (bos_text and text.startswith(bos_text))
    return _tokenize(model, text, add_special=add_bos, parse_special=True)


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens (-1: none)."""

    pre: int
    suf: int
    mid: int
    rep: int = -1
    sep: int = -1


def infill_layout(
    fim: FimTokens,
    prefix: list[int],
    suffix: list[int],
    *,
    bos: int | None,
    repo: list[int],
    file: list[int],
    n_batch: int,
    n_predict: int,
    n_ctx: int,
) -> list[int]:
    """The fill-in-the-middle prompt as llama-server's /infill lays it out (its `format_prompt_infill`,
    no extra chunks, no `prompt`, not SPM order):

        [extra: FIM_REP repo FIM_SEP file] [BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID

    the extra header only where the vocabulary has those tokens and the context has room; the prefix
    keeps its last 3/4 of a batch of tokens, the suffix its first (1/4 of a batch - 2), as there.
    """
    extra: list[int] = []
    if fim.rep >= 0:
        extra += [fim.rep, *repo]
    if fim.sep >= 0:
        extra += [fim.sep, *file]
    n_prefix = min(len(prefix), 3 * (n_batch // 4))
    n_suffix = min(len(suffix), max(0, n_batch // 4 - 2))
    n_extra = min(max(0, n_ctx - n_batch - 2 * n_predict), len(extra))
    head = [fim.pre, *prefix[len(prefix) - n_prefix :]]
    if bos is not None:
        head.insert(0, bos)
    return [*extra[len(extra) - n_extra :], *head, fim.suf, *suffix[:n_suffix], fim.mid]


def infill_tokens(
    model: LlamaModel, prefix: str | Sequence[int], suffix: str, *, n_batch: int, n_predict: int, n_ctx: int
) -> list[int]:
    """A completion's prompt with a `suffix`: what comes before (text, or token ids) and after the
    middle the model writes. InfillNotSupported without FIM tokens."""
    pre, suf, mid, rep, sep = model.fim_tokens()
    if pre < 0 or suf < 0 or mid < 0:
        raise InfillNotSupported()

    def tokens(text: str) -> list[int]:
        return _tokenize(model, text, add_special=False, parse_special=False)

    return infill_layout(
        FimTokens(pre, suf, mid, rep, sep),
        tokens(prefix) if isinstance(prefix, str) else token_ids(model, prefix),
        tokens(suffix),
        bos=model.bos if model.add_bos and model.bos >= 0 else None,
        repo=tokens("myproject\n"),  # llama-server's placeholders (its TODOs: no input for them yet)
        file=tokens("filename\n"),
        n_batch=n_batch,
        n_predict=n_predict,
        n_ctx=n_ctx,
    )


# JSON can spell a lone surrogate (\ud800), which Python's parser keeps in the string; UTF-8 cannot.
_NOT_UTF8 = "text must be valid Unicode: a lone surrogate (\\ud800-\\udfff) has no UTF-8 form"


def _tokenize(model: LlamaModel, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
    try:
        return model.tokenize(text, add_special=add_special, parse_special=parse_special)
    except UnicodeEncodeError:
        raise InvalidPrompt(_NOT_UTF8) from None
