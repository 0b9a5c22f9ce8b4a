"""Request bodies: parse, then validate strictly (wrong types are 400s, not silent coercions).

Unknown fields are ignored, as OpenAI clients send extras (`user`, `metadata`); fields we know but do
not support (n > 1, echo, suffix, tools, logit_bias) are refused with a message saying so.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from appliance.web.errors import BadRequest

__all__ = [
    "CompletionRequest",
    "ChatRequest",
    "ChatMessage",
    "LoadModelRequest",
    "UnloadModelRequest",
    "parse",
]

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Prob | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    min_p: Prob | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1, le=1 << 16)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=-1, lt=1 << 64)] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=128)] = 1
    logit_bias: dict[str, float] | None = None
    # The original appliance API's per-request knobs.
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_ctx: Annotated[int, Field(ge=1, le=1 << 20)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        if self.n != 1:
            raise ValueError("n: only n=1 is supported; send separate requests (they are batched together)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if self.max_tokens is not None and self.max_tokens != -1 and self.max_tokens < 1:
            raise ValueError("max_tokens: must be at least 1 (or -1 for the rest of the context)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(s == "" for s in stops):
            raise BadRequest("stop: stop strings must not be empty", param="stop")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[int, Field(ge=0, le=100)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _supported_completion(self) -> CompletionRequest:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt: must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise ValueError("prompt: only one prompt per request is supported")
        if self.echo:
            raise ValueError("echo: not supported")
        if self.suffix:
            raise ValueError("suffix: not supported")
        if self.best_of not in (None, 1):
            raise ValueError("best_of: only 1 is supported")
        return self


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=100)] | None = None
    tools: list[Any] | None = None
    # The second seed service's `device`: models are placed by their configuration, this is checked only.
    device: Literal["cpu", "cuda", "metal", "auto"] | None = None

    @model_validator(mode="after")
    def _supported_chat(self) -> ChatRequest:
        if self.tools:
            raise ValueError("tools: tool calling is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens: must be at least 1")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class LoadModelRequest(_Body):
    model_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
    model_path: Annotated[str, Field(min_length=1, max_length=4096)]
    n_ctx: Annotated[int, Field(ge=64, le=1 << 20)] | None = None
    parallel: Annotated[int, Field(ge=1, le=256)] | None = None
    n_gpu_layers: Annotated[int, Field(ge=-1)] | None = None
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None


class UnloadModelRequest(_Body):
    model_name: Annotated[str, Field(min_length=1, max_length=128)]


def _legacy_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The second seed service's chat shape: {"model-name", "prompt", "max-token", "device"}."""
    if "prompt" not in body:
        raise BadRequest("prompt: Field required", param="prompt")
    out = {k: v for k, v in body.items() if k not in ("model-name", "prompt", "max-token")}
    out["model"] = body.get("model-name")
    out["messages"] = [{"role": "user", "content": body.get("prompt")}]
    if "max-token" in body:
        out["max_tokens"] = body["max-token"]
    return out


_TYPE_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|tuple)$|[\[\(]")

_Model = TypeVar("_Model", bound=BaseModel)


def parse(model: type[_Model], body: Any) -> _Model:
    """Validate a parsed JSON body; the first error becomes a 400 naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    if model is ChatRequest and "model-name" in body and "messages" not in body:
        body = _legacy_chat(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        # Union members show up in pydantic's location as type tags ("str", "list[int]"): drop them.
        loc = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or not _TYPE_TAG.search(str(p)))
        msg = err["msg"].removeprefix("Value error, ")
        param = loc.split(".")[0] if loc else (msg.split(":")[0] if ":" in msg else None)
        text = f"{loc}: {msg}" if loc else msg
        raise BadRequest(text, param=param) from None
