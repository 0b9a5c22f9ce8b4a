"""Chat prompts: the model's own template, or the llama.cpp built-in one that fits it.

Where a template comes from, first match wins:
1. the model's `chat_template` setting: Jinja text, or the name of one of llama.cpp's built-in
   templates ("gemma", "llama3", "chatml", ...);
2. the GGUF's `tokenizer.chat_template` (or, lacking it, `tokenizer.chat_template.tool_use`; Jinja);
3. a built-in llama.cpp template, when the GGUF has none: the one llama.cpp itself names for the
   model (`llama_model_chat_template`), else the one whose turn markers the vocabulary holds as
   special tokens, checked against the architecture first (`general.architecture`);
4. none: chat requests get a 400 naming the `chat_template` setting (completions still work). A
   format whose markers the model does not have is never used: it would only echo them as text.

Tool calling (the generic format, llama.cpp's for models without a tool-call format of their own):
a request that calls tools gets a system instruction (`tool_instruction`: the tools, name, description
and parameters as JSON, and the exact JSON reply), appended to its first system message or put before
the others as one. The conversation's own tool traffic is rendered as text, in the form the model is
asked to write: an assistant turn that called tools becomes its reply `{"tool_calls": [{"name": ...,
"arguments": {...}}]}` (after its text, if it had some), and a tool message becomes a user turn
`Tool result (<call id>, <function name>): <content>`. A Jinja template that renders tools, tool calls
and tool results itself (found by rendering probes, once per template) gets them as they are instead:
`tools` as OpenAI's function tools, each call's arguments as an object, `tool_call_id` kept; its
instruction then only asks for the JSON reply. Should such a template refuse a conversation (some
take one call per message only), the generic text is rendered instead. llama.cpp's built-in
templates know none of this.

Jinja templates come from a file or a config the operator chose, but they are still code: they run in
Jinja's immutable sandbox, and a template error becomes a 400, never a traceback. Built-in templates
are rendered by llama.cpp itself (`llama_chat_apply_template`), so the bytes are the ones llama.cpp
and its server would produce.
"""

from __future__ import annotations

import ctypes
import datetime
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from appliance.engine.errors import InvalidPrompt, NoChatTemplate

if TYPE_CHECKING:
    from appliance.engine.llama import LlamaModel

__all__ = [
    "ChatTemplate",
    "NoChatTemplate",
    "builtin_templates",
    "detect_builtin",
    "model_chat_template",
    "render_chat",
    "ToolPrompt",
    "tool_instruction",
    "jinja_renders_tools",
]

# Built-in templates recognised from a model's vocabulary, most specific first: (llama.cpp's name,
# the architectures it belongs to, the turn markers the vocabulary must hold as special tokens).
# The markers are the ones llama.cpp's own llm_chat_detect_template looks for in template text.
_BY_VOCABULARY: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    ("gemma", frozenset({"gemma", "gemma2", "gemma3", "gemma3n"}), ("<start_of_turn>", "<end_of_turn>")),
    ("llama4", frozenset({"llama4"}), ("<|header_start|>", "<|header_end|>", "<|eot|>")),
    ("llama3", frozenset({"llama"}), ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    ("gpt-oss", frozenset({"gpt-oss"}), ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")),
    ("phi4", frozenset({"phi3"}), ("<|im_start|>", "<|im_sep|>", "<|im_end|>")),
    ("chatml", frozenset({"qwen2", "qwen2moe", "qwen3", "qwen3moe"}), ("<|im_start|>", "<|im_end|>")),
    ("mistral-v7", frozenset(), ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[INST]", "[/INST]")),
    ("mistral-v3", frozenset(), ("[INST]", "[/INST]")),
    ("phi3", frozenset({"phi3"}), ("<|user|>", "<|assistant|>", "<|end|>")),
    ("command-r", frozenset({"command-r", "cohere2"}),
     ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")),
    ("granite", frozenset({"granite", "granitemoe"}), ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>")),
    ("exaone3", frozenset({"exaone"}), ("[|system|]", "[|assistant|]", "[|endofturn|]")),
)

# llama.cpp's mistral templates differ in spacing with the Tekken tokenizer (`tokenizer.ggml.pre`).
_TEKKEN = {"mistral-v7": "mistral-v7-tekken", "mistral-v3": "mistral-v3-tekken"}

# OpenAI's "developer" role is the system prompt; llama.cpp's built-in templates only know "system".
_BUILTIN_ROLES = {"developer": "system"}

# llama.h's llama_token_attr: tokens that are markers, not text.
_ATTR_CONTROL = 1 << 3
_ATTR_USER_DEFINED = 1 << 4


@dataclass(frozen=True)
class ChatTemplate:
    """A model's chat format and where it came from. `name` is set for llama.cpp's built-in templates
    (rendered by llama.cpp), `jinja` for Jinja text (rendered here, sandboxed)."""

    source: Literal["gguf", "config", "builtin"]
    name: str | None = None
    jinja: str | None = None

    @classmethod
    def configured(cls, text: str) -> ChatTemplate:
        """The `chat_template` setting: a built-in template's name, or else Jinja text."""
        name = text.strip()
        if name in builtin_templates():
            return cls("config", name=name)
        return cls("config", jinja=text)

    def status(self) -> dict[str, Any]:
        return {"source": self.source, "name": self.name}

    def describe(self) -> str:
        what = f"llama.cpp's built-in '{self.name}' template" if self.name else "a Jinja template"
        where = {"gguf": "from the GGUF metadata", "config": "from the chat_template setting"}
        return f"{what}, {where.get(self.source, 'chosen for this model')}"


# -- choosing (at load, in the thread pool) -------------------------------------------------------


@lru_cache(maxsize=1)
def builtin_templates() -> frozenset[str]:
    """The names llama.cpp's `llama_chat_apply_template` accepts as built-in templates."""
    import llama_cpp.llama_cpp as C

    n = C.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * n)()
    C.llama_chat_builtin_templates(names, n)
    return frozenset(name.decode() for name in names)


def detect_builtin(
    *,
    architecture: str | None,
    has_special: Callable[[str], bool],
    tokenizer_pre: str | None = None,
    available: Collection[str] | None = None,
) -> str | None:
    """The built-in template for a model without one, from its architecture and the special tokens
    of its vocabulary (`has_special(marker)`); None when nothing fits. A template is only chosen when
    the vocabulary holds every one of its markers: first among those of the model's architecture,
    then in the table's order."""
    available = builtin_templates() if available is None else available
    fits = [name for name, _, markers in _BY_VOCABULARY if all(has_special(m) for m in markers)]
    own = [name for name, archs, _ in _BY_VOCABULARY if architecture in archs and name in fits]
    for name in own + fits:
        if tokenizer_pre == "tekken":
            name = _TEKKEN.get(name, name)
        if name in available:
            return name
    return None


def model_chat_template(model: LlamaModel, configured: str | None) -> ChatTemplate | None:
    """The chat template for a loaded model (`engine.llama.LlamaModel`); blocking C calls: run it in
    the thread pool, not on the event loop."""
    if configured:
        return ChatTemplate.configured(configured)
    # llama.cpp's server takes the named `tool_use` template when a file has only that one.
    gguf = model.meta("tokenizer.chat_template") or model.meta("tokenizer.chat_template.tool_use")
    if gguf:
        return ChatTemplate("gguf", jinja=gguf)
    architecture = model.meta("general.architecture")
    if not architecture:  # llama.cpp loads no such file; nothing to go on
        return None
    # Without a template in the file, llama.cpp names a built-in one for a few popular models.
    named = _llama_default_template(model)
    if named and named in builtin_templates():
        return ChatTemplate("builtin", name=named)
    name = detect_builtin(
        architecture=architecture,
        has_special=lambda marker: _is_special_token(model, marker),
        tokenizer_pre=model.meta("tokenizer.ggml.pre"),
    )
    return ChatTemplate("builtin", name=name) if name else None


def _llama_default_template(model: LlamaModel) -> str | None:
    import llama_cpp.llama_cpp as C

    raw = C.llama_model_chat_template(model.ptr, None)
    return raw.decode("utf-8", "replace") if raw else None


def _is_special_token(model: LlamaModel, marker: str) -> bool:
    """Whether the vocabulary holds `marker` as one control or user-defined token."""
    import llama_cpp.llama_cpp as C

    tokens = model.tokenize(marker, add_special=False, parse_special=True)
    if len(tokens) != 1 or model.token_text(tokens[0]) != marker:
        return False
    return bool(C.llama_vocab_get_attr(model.vocab, tokens[0]) & (_ATTR_CONTROL | _ATTR_USER_DEFINED))


# -- rendering (per request) ----------------------------------------------------------------------


def _raise(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
    env.globals["raise_exception"] = _raise
    env.filters["tojson"] = _tojson
    return env.from_string(source)


def _tojson(
    value: Any,
    indent: int | str | None = None,
    ensure_ascii: bool = False,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


@dataclass(frozen=True)
class ToolPrompt:
    """The tools a chat request lets the model call, for its prompt: OpenAI's function tools
    (`{"type": "function", "function": {"name", "description", "parameters"}}`), whether a call is
    required (and of which `function`, if one is named), and whether several calls may come at once."""

    tools: tuple[Mapping[str, Any], ...]
    required: bool
    function: str | None = None
    parallel: bool = True


def tool_instruction(tools: ToolPrompt, *, list_tools: bool = True) -> str:
    """The system instruction for a request that calls tools: the tools (where the template does not
    list them itself) and the one JSON object to reply with."""
    lines: list[str] = []
    if list_tools:
        lines.append("You can call these tools (functions), given as JSON:")
        for t in tools.tools:
            f = t.get("function", {})
            described = {"name": f.get("name"), "description": f.get("description", ""),
                         "parameters": f.get("parameters") or {"type": "object"}}
            lines.append(json.dumps(described, ensure_ascii=False))
        lines.append("")
    how_many = "one call or more" if tools.parallel else "exactly one call"
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments, as the tool\'s parameters say>}}]}'
    if tools.function is not None:
        lines.append(f"You must call the tool {tools.function}. Reply with only this JSON object ({how_many}):")
        lines.append(call.replace("<tool name>", tools.function))
    elif tools.required:
        lines.append(f"You must call a tool. Reply with only this JSON object ({how_many}):")
        lines.append(call)
    else:
        lines.append(f"Reply with only one JSON object: to call tools ({how_many}),")
        lines.append(call)
        lines.append("or, to answer without calling a tool,")
        lines.append('{"response": "<your answer>"}')
    return "\n".join(lines)


def _arguments(raw: Any) -> Any:
    """A call's arguments as an object where they are JSON (the wire sends them as a string)."""
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def _with_instruction(messages: list[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """The instruction appended to the first message's text if that is a system (or developer)
    message, else a system message before them all (many templates take only one, first)."""
    if messages and messages[0].get("role") in ("system", "developer"):
        first = dict(messages[0])
        text = first.get("content") or ""
        first["content"] = f"{text}\n\n{instruction}" if text else instruction
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def _generic_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation's tool calls and tool results as text (the module's docstring has the form);
    other messages as they are."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = m.get("tool_calls") or []
        if m.get("role") == "assistant" and calls:
            reply = {"tool_calls": [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])} for c in calls
            ]}
            for c in calls:
                names[c["id"]] = c["function"]["name"]
            text = m.get("content") or ""
            as_json = json.dumps(reply, ensure_ascii=False)
            out.append({"role": "assistant", "content": f"{text}\n{as_json}" if text else as_json})
        elif m.get("role") == "tool":
            call_id = m.get("tool_call_id")
            about = ", ".join(x for x in (call_id, names.get(call_id or "")) if x)
            head = f"Tool result ({about})" if about else "Tool result"
            out.append({"role": "user", "content": f"{head}: {m.get('content') or ''}"})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    return out


def _native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a template that renders tool traffic itself: each call's arguments an object."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            m["tool_calls"] = [
                {**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in m["tool_calls"]
            ]
        out.append(m)
    return out


_PROBE_NAME = "appliance_probe_fn_7f3a"
_PROBE_ARG = "appliance_probe_arg_7f3a"
_PROBE_RESULT = "appliance_probe_result_7f3a"


@lru_cache(maxsize=32)
def jinja_renders_tools(source: str) -> bool:
    """Whether a Jinja template renders tools, assistant tool calls (arguments as an object) and tool
    results itself: each probe's marker must come out in the text (llama.cpp's minja asks the same)."""
    tool = {"type": "function", "function": {"name": _PROBE_NAME, "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    call = {"id": "call_probe", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": _PROBE_ARG}}}
    user = {"role": "user", "content": "Hi"}
    asked = {"role": "assistant", "content": None, "tool_calls": [call]}
    probes = (
        ([user], [tool], _PROBE_NAME),
        ([user, asked], None, _PROBE_ARG),
        ([user, asked, {"role": "tool", "tool_call_id": "call_probe", "content": _PROBE_RESULT}], None, _PROBE_RESULT),
    )
    try:
        template = _compile(source)
        for messages, tools, marker in probes:
            text = template.render(messages=messages, tools=tools, add_generation_prompt=True, bos_token="",
                                   eos_token="", strftime_now=datetime.datetime(2025, 1, 1).strftime)
            if marker not in text:
                return False
    except Exception:  # a template that cannot render a probe does not render tools
        return False
    return True


def render_chat(
    template: ChatTemplate | None,
    messages: list[dict[str, Any]],
    *,
    model_name: str,
    bos_token: str,
    eos_token: str,
    now: datetime.datetime | None = None,
    tools: ToolPrompt | None = None,
) -> str:
    """Render messages into the prompt text the model was trained on, ready for generation; with
    `tools`, the tool instruction too (the module's docstring says how tool traffic is rendered).

    A built-in template is rendered by llama.cpp (a short C call that releases the GIL)."""
    if template is None:
        raise NoChatTemplate(
            f"The model '{model_name}' has no chat template and none of llama.cpp's built-in templates "
            "fits its vocabulary, so it cannot serve chat requests (completions work). Set the model's "
            "chat_template setting to a Jinja template or to a built-in template's name (e.g. gemma, "
            "llama3, chatml)."
        )
    has_tool_traffic = any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)
    if template.name is not None:
        return _apply_builtin(template.name, _tool_text(messages, tools, native=False, traffic=has_tool_traffic))
    source = template.jinja or ""
    when = now or datetime.datetime.now(datetime.UTC)

    def jinja(messages: list[dict[str, Any]], **extra: Any) -> str:
        return _compile(source).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
            strftime_now=when.strftime,
            **extra,
        )

    if (tools is not None or has_tool_traffic) and jinja_renders_tools(source):
        try:
            extra = {"tools": [dict(t) for t in tools.tools]} if tools is not None else {}
            return jinja(_tool_text(messages, tools, native=True, traffic=has_tool_traffic), **extra)
        except Exception:  # a native rendering it refuses (say, several calls at once): the generic one
            pass
    try:
        return jinja(_tool_text(messages, tools, native=False, traffic=has_tool_traffic))
    except jinja2.TemplateError as e:
        raise InvalidPrompt(f"the model's chat template rejected them: {e.message}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError):
        raise InvalidPrompt("the model's chat template could not render them") from None


def _tool_text(
    messages: list[dict[str, Any]], tools: ToolPrompt | None, *, native: bool, traffic: bool
) -> list[dict[str, Any]]:
    """The messages with their tool traffic rendered (as they are for a template that renders it, else
    as text) and the tool instruction, where the request calls tools."""
    if traffic:
        messages = _native_messages(messages) if native else _generic_messages(messages)
    if tools is not None:
        messages = _with_instruction(messages, tool_instruction(tools, list_tools=not native))
    return messages


def _apply_builtin(name: str, messages: list[dict[str, Any]]) -> str:
    import llama_cpp.llama_cpp as C

    encoded = []
    for m in messages:
        content = (m.get("content") or "").encode("utf-8")
        if b"\0" in content:  # C strings: the rest of the message would silently vanish
            raise InvalidPrompt("a message contains a NUL character")
        encoded.append((_BUILTIN_ROLES.get(m["role"], m["role"]).encode(), content))
    chat = (C.llama_chat_message * len(encoded))(*(C.llama_chat_message(r, c) for r, c in encoded))
    size = 2 * sum(len(c) for _, c in encoded) + 256
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = C.llama_chat_apply_template(name.encode(), chat, len(encoded), True, buf, size)
        if n < 0:
            raise InvalidPrompt(f"llama.cpp's '{name}' chat template could not render them")
        if n <= size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n
    raise InvalidPrompt(f"llama.cpp's '{name}' chat template could not render them")
