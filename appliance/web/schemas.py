"""Request bodies: parse, then validate strictly (wrong types are 400s, not silent coercions).

Unknown fields are ignored, as OpenAI clients send extras (`user`, `metadata`); fields we know but do
not support (`best_of` other than 1 or `n`, `echo` with `logprobs`) are refused with a message
saying so. `n` choices (up to the model's parallel slots, checked against the model) share one decode
of the prompt; `echo` prepends a completion's prompt to each choice; `suffix` asks a model with FIM
tokens to fill in the middle (checked against the model).

Tool calling comes as OpenAI's `tools` (functions only), `tool_choice` and `parallel_tool_calls`;
each function's `parameters` schema is checked here as a `response_format` schema is (every keyword
enforced, or refused by name), and `ChatRequest.tool_use()` says what the reply must be. A request
that calls tools (tool_choice other than none) cannot also constrain the output another way. The
Responses API takes the same functions in its flat shape (`ResponseTool`, `ResponseRequest.tool_use()`),
and its input items include function calls and their results.

Structured output comes as OpenAI's `response_format` (text, json_object, json_schema) or
llama-server's `grammar` (GBNF) and `json_schema`: at most one of them per request. Their contents
(a schema's keywords, a grammar's syntax) are checked by the engine, against the model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from appliance.engine.errors import InvalidGrammar
from appliance.engine.grammar import JSON_OBJECT_GBNF, ToolSpec, check_schema
from appliance.web.errors import BadRequest

__all__ = [
    "CompletionRequest",
    "ChatRequest",
    "ChatMessage",
    "Tool",
    "ToolCall",
    "ToolUse",
    "MAX_TOOLS",
    "ResponseFormat",
    "OutputConstraint",
    "MAX_LOGIT_BIAS",
    "LoadModelRequest",
    "UnloadModelRequest",
    "TokenizeRequest",
    "DetokenizeRequest",
    "ChatTokensRequest",
    "CompletionTokensRequest",
    "MAX_DETOKENIZE_TOKENS",
    "EmbeddingRequest",
    "RerankRequest",
    "MAX_EMBEDDING_INPUTS",
    "ResponseRequest",
    "InputMessage",
    "InputItem",
    "FunctionCallInput",
    "FunctionCallOutputInput",
    "ResponseTool",
    "ConversationCreateRequest",
    "ConversationUpdateRequest",
    "ConversationItemsRequest",
    "MAX_ITEMS_PER_REQUEST",
    "parse",
]

Prob = Annotated[float, Field(ge=0.0, le=1.0)]
MAX_TOKENS_CAP = 1 << 20
"""The largest max_tokens any configuration allows (limits.max_tokens is at most this)."""
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]

MAX_LOGIT_BIAS = 1024
"""The most tokens one request may bias."""
_TOKEN_ID = re.compile(r"^(0|[1-9][0-9]{0,9})$")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    """OpenAI's `response_format.json_schema`. `strict` is accepted either way: the schema is always
    enforced (every keyword it has is, or the request is refused)."""

    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    """llama-server's form: `{"type": "json_object", "schema": {...}}`."""

    @model_validator(mode="after")
    def _shape(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format: type json_schema needs a json_schema object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError("response_format: json_schema is only allowed with type json_schema")
        if self.type != "json_object" and self.schema_ is not None:
            raise ValueError("response_format: schema is only allowed with type json_object")
        return self


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    """logit_bias (chat, completions, responses): bounded, and keyed by decimal token ids."""
    if not bias:
        return
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias: at most {MAX_LOGIT_BIAS} tokens")
    bad = next((k for k in bias if not _TOKEN_ID.match(k)), None)
    if bad is not None:
        raise ValueError(f"logit_bias: keys are token ids (decimal integers); {bad[:32]!r} is not one")


def _biases(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    return tuple((int(k), v) for k, v in (bias or {}).items())


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(s == "" for s in stops):
        raise BadRequest("stop: stop strings must not be empty", param="stop")
    return tuple(stops)


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
    logit_bias: dict[str, Bias] | None = None
    response_format: ResponseFormat | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # The original appliance API's per-request knobs.
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_ctx: Annotated[int, Field(ge=1, le=1 << 20)] | None = None

    @model_validator(mode="after")
    def _supported(self) -> _Sampling:
        _check_logit_bias(self.logit_bias)
        given = [
            name
            for name, on in (
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("grammar", bool(self.grammar)),
                ("json_schema", self.json_schema is not None),
            )
            if on
        ]
        if len(given) > 1:
            raise ValueError(f"{given[1]}: only one of response_format, grammar and json_schema may constrain the output")
        if self.max_tokens is not None and self.max_tokens != -1 and self.max_tokens < 1:
            raise ValueError("max_tokens: must be at least 1 (or -1 for the rest of the context)")
        # Checked here even where it is not used (chat's max_completion_tokens takes precedence): the
        # spec's bound holds for every field sent (schemathesis found an out-of-range one accepted).
        if self.max_tokens is not None and self.max_tokens > MAX_TOKENS_CAP:
            raise ValueError(f"max_tokens: at most {MAX_TOKENS_CAP}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def stops(self) -> tuple[str, ...]:
        return _stops(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs (the keys are checked to be decimal integers)."""
        return _biases(self.logit_bias)

    def output_constraint(self) -> OutputConstraint | None:
        """What constrains the output, if anything: the field it came from, and GBNF text or a schema."""
        if self.grammar:
            return OutputConstraint("grammar", gbnf=self.grammar)
        if self.json_schema is not None:
            return OutputConstraint("json_schema", schema=self.json_schema)
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            if rf.schema_ is not None:
                return OutputConstraint("response_format", schema=rf.schema_)
            return OutputConstraint("response_format", gbnf=JSON_OBJECT_GBNF)
        js = rf.json_schema
        if js is None or js.schema_ is None:  # OpenAI's schema is optional: then any JSON object
            return OutputConstraint("response_format", gbnf=JSON_OBJECT_GBNF)
        return OutputConstraint("response_format", schema=js.schema_)


@dataclass(frozen=True)
class OutputConstraint:
    param: Literal["grammar", "json_schema", "response_format"]
    gbnf: str | None = None
    schema: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    logprobs: Annotated[int, Field(ge=0, le=100)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _supported_completion(self) -> CompletionRequest:
        _check_prompt(self.prompt)
        if self.echo and self.logprobs is not None:
            raise ValueError("echo: not supported together with logprobs (the prompt's logprobs are not computed)")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of: only 1 or n is supported (every choice generated is returned)")
        return self


def _check_prompt(prompt: str | list[str] | list[int]) -> None:
    if isinstance(prompt, list):
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if isinstance(prompt[0], str) and len(prompt) != 1:
            raise ValueError("prompt: only one prompt per request is supported")


class TextPart(_Body):
    type: Literal["text"]
    text: str


MAX_PREDICTION_CHARS = 1 << 20


class Prediction(_Body):
    """Predicted Outputs: text the answer probably repeats (engine/draft.py)."""

    type: Literal["content"]
    content: Annotated[str, Field(max_length=MAX_PREDICTION_CHARS)] | Annotated[list[TextPart], Field(max_length=1024)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


MAX_TOOLS = 128
"""The most tools one chat request may offer (OpenAI's own limit)."""
_FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(_Body):
    """A tool's function. `strict` is accepted either way: the parameters schema is always enforced
    (every keyword it has is, or the request is refused)."""

    name: Annotated[str, Field(pattern=_FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _enforceable(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                check_schema(value)
            except InvalidGrammar as e:
                raise ValueError(f"unsupported JSON schema: {e.message}") from None
        return value


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class CalledFunction(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str


class ToolCall(_Body):
    """A call an assistant message made (sent back in the conversation's history)."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: CalledFunction


@dataclass(frozen=True)
class ToolUse:
    """What a chat request's reply must be when it calls tools: a call to one of `tools` (or, with
    mode "auto", that or text), one call or more where `parallel`. `tools` is the offered functions
    as OpenAI spells them (for the prompt), narrowed to the named one where tool_choice names one
    (then exactly one call, as OpenAI forces a named function)."""

    tools: tuple[dict[str, Any], ...]
    mode: Literal["auto", "required"]
    function: str | None
    parallel: bool

    @property
    def specs(self) -> tuple[ToolSpec, ...]:
        return tuple(ToolSpec(t["function"]["name"], t["function"].get("parameters") or {}) for t in self.tools)


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: Annotated[str, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message has tool calls")
        if self.tool_call_id is not None and self.role != "tool":
            raise ValueError("tool_call_id: only a tool message answers a tool call")
        return self

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
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    prediction: Prediction | None = None
    # The second seed service's `device`: models are placed by their configuration, this is checked only.
    device: Literal["cpu", "cuda", "metal", "auto"] | None = None

    @model_validator(mode="after")
    def _supported_chat(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or ()]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"tools: function names must be unique; '{twice}' appears twice")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice: no function named '{choice.function.name[:64]}' in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        if self.tool_use() is not None:
            constrained = self.output_constraint()
            if constrained is not None:
                raise ValueError(f"{constrained.param}: not together with tools (unless tool_choice is none)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        if self.prediction is not None and self.n > 1:
            raise ValueError("prediction: not with n > 1 (only one choice can follow a prediction)")
        if self.max_completion_tokens is not None and self.max_completion_tokens < 1:
            raise ValueError("max_completion_tokens: must be at least 1")
        if self.max_completion_tokens is not None and self.max_completion_tokens > MAX_TOKENS_CAP:
            raise ValueError(f"max_completion_tokens: at most {MAX_TOKENS_CAP}")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def tool_use(self) -> ToolUse | None:
        """What the reply must be, when this request calls tools (tools given, tool_choice not none)."""
        if not self.tools or self.tool_choice == "none":
            return None
        parallel = self.parallel_tool_calls is not False
        offered = tuple(t.model_dump(exclude_none=True) for t in self.tools)
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):  # OpenAI's "forced function": exactly one call to it
            named = tuple(t for t in offered if t["function"]["name"] == choice.function.name)
            return ToolUse(named, "required", choice.function.name, False)
        return ToolUse(offered, "required" if choice == "required" else "auto", None, parallel)


class LoadModelRequest(_Body):
    model_name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
    model_path: Annotated[str, Field(min_length=1, max_length=4096)]
    n_ctx: Annotated[int, Field(ge=64, le=1 << 20)] | None = None
    parallel: Annotated[int, Field(ge=1, le=256)] | None = None
    n_gpu_layers: Annotated[int, Field(ge=-1)] | None = None
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    embeddings: bool | None = None
    pooling: Literal["mean", "cls", "last", "rank"] | None = None


class UnloadModelRequest(_Body):
    model_name: Annotated[str, Field(min_length=1, max_length=128)]


MAX_DETOKENIZE_TOKENS = 1 << 20
"""The most token ids one /detokenize takes: the largest context a model can be configured with."""


class TokenizeRequest(_Body):
    """llama-server's /tokenize body (its defaults too); `model` may be left out while exactly one
    model is ready."""

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    """llama-server's /detokenize body; `model` as for /tokenize."""

    model: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    tokens: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_DETOKENIZE_TOKENS)]


class ChatTokensRequest(_Body):
    """A chat completion's body, of which only what makes its prompt is read: the rest is ignored."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]


class CompletionTokensRequest(_Body):
    """A completion's body, of which only what makes its prompt is read: the rest is ignored."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: str | list[str] | list[int]
    suffix: str | None = None
    """Fill in the middle: the prompt is laid out as the completion's would be (its FIM tokens)."""
    max_tokens: Annotated[int, Field(ge=-1, le=MAX_TOKENS_CAP)] | None = None
    """Only with `suffix`: how much of the context the layout leaves for the answer."""

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionTokensRequest:
        _check_prompt(self.prompt)
        return self


MAX_EMBEDDING_INPUTS = 2048
"""The most inputs one /v1/embeddings request may carry (OpenAI's own limit)."""


class EmbeddingRequest(_Body):
    """OpenAI's /v1/embeddings body: one text, texts, one token-id list or token-id lists."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
        | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]],
            Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS),
        ]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=1 << 16)] | None = None
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        """The inputs as a list: texts, or token-id lists."""
        given = self.input
        if isinstance(given, str):
            return [given]
        if all(isinstance(t, int) for t in given):
            return [[t for t in given if isinstance(t, int)]]
        if all(isinstance(t, str) for t in given):
            return [t for t in given if isinstance(t, str)]
        return [t for t in given if isinstance(t, list)]


class RerankRequest(_Body):
    """llama-server's (Jina's, Cohere's) /v1/rerank body: `top_n` the best documents answered (all,
    unset; more than there are is all), `return_documents` each one's text beside its score."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    query: str
    documents: Annotated[list[str], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    return_documents: bool = False


# -- the Responses and Conversations APIs ----------------------------------------------------------

MAX_ITEMS_PER_REQUEST = 20
"""Items one POST /v1/conversations or .../items may add (OpenAI's own limit)."""

Metadata = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]], Field(max_length=16)
]
"""OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512."""


class InputText(_Body):
    type: Literal["input_text"]
    text: str


class OutputText(_Body):
    """An assistant message's text, as a response's output gives it (sent back as input)."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessage(_Body):
    """A message item: OpenAI's EasyInputMessage (content a string) or a message item with text
    parts. Other item types (item references, reasoning, ...; function calls and their outputs are
    items of their own, below) and other content (images, files, audio) are refused naming them. An
    `id` or `status` sent is ignored: every stored item gets the server's own id."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: list[Annotated[InputText | OutputText, Field(discriminator="type")]] | str

    @model_validator(mode="before")
    @classmethod
    def _message_items_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type", "message") not in ("message", None):
            kind = str(data["type"])[:64]
            raise ValueError(f"item type {kind!r} is not supported: only message items with text, "
                             "function_call and function_call_output")
        return data

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionCallInput(_Body):
    """A function call the model made (OpenAI's `function_call` item), sent back as history. Its
    `arguments` must be JSON (the model's calls always are); an `id` or `status` sent is ignored."""

    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    name: Annotated[str, Field(min_length=1, max_length=64)]
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _json(cls, value: str) -> str:
        try:
            json.loads(value)
        except ValueError:
            raise ValueError("not valid JSON (a function call's arguments are a JSON string)") from None
        return value


class FunctionCallOutputInput(_Body):
    """A function's result (OpenAI's `function_call_output` item): text, or `input_text` parts (no
    images or files). Its `call_id` must name a `function_call` before it, in the input or the history
    (checked where the history is known: web/resources/responses.py)."""

    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=256)]
    # The list first: pydantic reports a union's errors in order, and the list's are the telling ones.
    output: list[Annotated[InputText, Field(discriminator="type")]] | str


def _item_kind(value: Any) -> str:
    """Which input item a value is: a function call, its output, or else a message (whose own check
    refuses any other type, naming it)."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("function_call", "function_call_output") else "message"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallInput, Tag("function_call")]
    | Annotated[FunctionCallOutputInput, Tag("function_call_output")],
    Discriminator(_item_kind),
]
"""One item of a response's `input` or of a conversation's `items`."""


class ResponseTool(FunctionDefinition):
    """A function tool in the Responses API's flat shape (`{"type": "function", "name", "description",
    "parameters", "strict"}`), its parameters checked as the chat route checks them."""

    type: Literal["function"]


class ResponseNamedToolChoice(_Body):
    """`tool_choice` forcing one function, in the Responses API's flat shape."""

    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=64)]


class ConversationRef(_Body):
    id: Annotated[str, Field(min_length=1, max_length=256)]


class TextFormat(_Body):
    """`text.format`: plain text, any JSON object, or JSON valid against `schema` (enforced as the chat
    route enforces `response_format`)."""

    type: Literal["text", "json_object", "json_schema"]
    name: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _shape(self) -> TextFormat:
        if self.type != "json_schema" and (self.schema_ is not None or self.name is not None or self.strict is not None):
            raise ValueError("text: name, schema and strict are only allowed with format type json_schema")
        return self


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponseStreamOptions(_Body):
    include_obfuscation: bool | None = None
    """Accepted; no obfuscation padding is ever added (the stream is signed, and TLS is the operator's)."""


def _function_typed(value: Any) -> bool:
    """Whether a tool (or a tool_choice object) is a function's: anything else, a built-in tool."""
    return not isinstance(value, dict) or value.get("type") == "function"


class ResponseRequest(_Body):
    """OpenAI's POST /v1/responses body, plus the chat route's llama.cpp sampling fields and original
    appliance fields. Known OpenAI fields this server cannot honour are refused naming them."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    # The list first: pydantic reports a union's errors in order, and the list's are the telling ones.
    input: Annotated[list[InputItem], Field(min_length=1)] | str | None = None
    instructions: str | None = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    conversation: Annotated[str, Field(min_length=1, max_length=256)] | ConversationRef | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: ResponseStreamOptions | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS_CAP)] | None = None
    metadata: Metadata | None = None
    truncation: Literal["auto", "disabled"] | None = None
    text: TextConfig | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Prob | None = None
    top_k: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    min_p: Prob | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    repeat_last_n: Annotated[int, Field(ge=-1, le=1 << 16)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Annotated[int, Field(ge=-1, lt=1 << 64)] | None = None
    ignore_eos: bool | None = None
    logit_bias: dict[str, Bias] | None = None
    stop: str | list[str] | None = None
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_ctx: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    # Function tools (the chat route's machinery: web/resources/responses.py).
    tools: Annotated[list[ResponseTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponseNamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Accepted and without effect here: who the end user is, cache and tier hints, and a limit on
    # calls to built-in tools (OpenAI's max_tool_calls), of which this server has none.
    user: Annotated[str, Field(max_length=256)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None
    prompt_cache_key: Annotated[str, Field(max_length=256)] | None = None
    service_tier: Literal["auto", "default"] | None = None
    max_tool_calls: Annotated[int, Field(ge=1)] | None = None
    # Refused unless absent, null or empty: features this server does not have.
    include: Annotated[list[Any], Field(max_length=0)] | None = None
    reasoning: Any = None
    prompt: Any = None
    background: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        """The refusals that say why (a bare range error would not), checked before the types."""
        if not isinstance(data, dict):
            return data
        refused: dict[str, tuple[Callable[[Any], bool], str]] = {  # field: (what may be sent, why else not)
            "tools": (lambda v: not isinstance(v, list) or all(_function_typed(t) for t in v),
                      "only function tools are supported (no built-in tools: web_search, file_search, mcp, ...)"),
            "tool_choice": (lambda v: not isinstance(v, dict) or _function_typed(v),
                            "only none, auto, required or {\"type\": \"function\", \"name\": ...} "
                            "(no built-in tools)"),
            "include": (lambda v: v is None or v == [] and isinstance(v, list),
                        "no additional output data can be included"),
            "reasoning": (lambda v: v is None, "reasoning options are not supported"),
            "prompt": (lambda v: v is None, "stored prompt templates are not supported"),
            "background": (lambda v: v is None or v is False, "background responses are not supported"),
            "top_logprobs": (lambda v: v is None or type(v) is int and v == 0,
                             "log probabilities are not supported on this route (use /v1/chat/completions)"),
        }
        for name, (allowed, reason) in refused.items():
            if name in data and not allowed(data[name]):
                raise ValueError(f"{name}: {reason}")
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ResponseRequest:
        if self.previous_response_id is not None and self.conversation is not None:
            raise ValueError("conversation: not together with previous_response_id (use one or the other)")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        _check_logit_bias(self.logit_bias)
        names = [t.name for t in self.tools or ()]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise ValueError(f"tools: function names must be unique; '{twice}' appears twice")
        choice = self.tool_choice
        if isinstance(choice, ResponseNamedToolChoice) and choice.name not in names:
            raise ValueError(f"tool_choice: no function named '{choice.name[:64]}' in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice: 'required' needs tools")
        if self.tool_use() is not None and self.output_constraint() is not None:
            raise ValueError("text: a format other than text is not supported together with tools "
                             "(unless tool_choice is none)")
        return self

    def tool_use(self) -> ToolUse | None:
        """What the reply must be, when this request calls tools (tools given, tool_choice not none):
        the chat route's `ToolUse`, the functions in chat's nested shape (for the prompt)."""
        if not self.tools or self.tool_choice == "none":
            return None
        offered: tuple[dict[str, Any], ...] = tuple(
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})} for t in self.tools
        )
        choice = self.tool_choice
        if isinstance(choice, ResponseNamedToolChoice):  # OpenAI's forced function: exactly one call to it
            named = tuple(t for t in offered if t["function"]["name"] == choice.name)
            return ToolUse(named, "required", choice.name, False)
        parallel = self.parallel_tool_calls is not False
        return ToolUse(offered, "required" if choice == "required" else "auto", None, parallel)

    def tools_shown(self) -> list[dict[str, Any]]:
        """The tools as a response object shows them (OpenAI's flat shape). `strict` is true unless
        the request said false: the parameters schema is enforced either way."""
        return [{"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters,
                 "strict": t.strict is not False} for t in self.tools or ()]

    def tool_choice_shown(self) -> str | dict[str, str]:
        choice = self.tool_choice
        if isinstance(choice, ResponseNamedToolChoice):
            return {"type": "function", "name": choice.name}
        return choice or "auto"

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c

    def stops(self) -> tuple[str, ...]:
        return _stops(self.stop)

    @property
    def biases(self) -> tuple[tuple[int, float], ...]:
        return _biases(self.logit_bias)

    def output_constraint(self) -> OutputConstraint | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object" or fmt.schema_ is None:
            return OutputConstraint("response_format", gbnf=JSON_OBJECT_GBNF)
        return OutputConstraint("response_format", schema=fmt.schema_)


class ConversationCreateRequest(_Body):
    items: Annotated[list[InputItem], Field(max_length=MAX_ITEMS_PER_REQUEST)] | None = None
    metadata: Metadata | None = None


class ConversationUpdateRequest(_Body):
    metadata: Metadata


class ConversationItemsRequest(_Body):
    items: Annotated[list[InputItem], Field(min_length=1, max_length=MAX_ITEMS_PER_REQUEST)]


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
