"""Tool calling in the engine (the generic format): the reply's JSON schema and its grammar, the tool
instruction and how a conversation's tool traffic becomes prompt text (llama.cpp's built-in templates,
a Jinja template that renders tools itself, one that does not), and constrained sampling with real
llama.cpp on a generated model (random weights: whatever it writes, a reply that completes parses and
each call's arguments validate against that tool's schema)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from appliance.engine.chat import ChatTemplate, ToolPrompt, jinja_renders_tools, render_chat, tool_instruction
from appliance.engine.errors import InvalidGrammar
from appliance.engine.events import Delta, Done, Failed, GenerationRequest
from appliance.engine.grammar import ToolSpec, build_grammar, check_gbnf, schema_gbnf, tool_calls_schema
from appliance.engine.llama import SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from tools.modelgen import ModelSpec, write_model

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
# pydantic's shape for a recursive model: a $ref at the top, beside $defs
TREE = {
    "$ref": "#/$defs/Node",
    "$defs": {"Node": {"type": "object", "properties": {
        "label": {"type": "string", "maxLength": 5},
        "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}, "maxItems": 2},
    }, "required": ["label", "kids"], "additionalProperties": False}},
}
TOOLS = (ToolSpec("get_weather", WEATHER), ToolSpec("tree-walk", TREE), ToolSpec("ping", {}))


def call(name, arguments):
    return {"name": name, "arguments": arguments}


# ---------------------------------------------------------------------------------------------
# The reply's schema (validated by jsonschema: it is what the grammar is made from)


def test_required_calls_are_one_of_the_tools_with_its_arguments():
    schema = tool_calls_schema(TOOLS, mode="required", parallel=True)
    ok = {"tool_calls": [call("get_weather", {"city": "Oslo", "unit": "c"}), call("ping", {"any": [1]}),
                         call("tree-walk", {"label": "a", "kids": [{"label": "b", "kids": []}]})]}
    jsonschema.validate(ok, schema)
    for bad in (
        {"tool_calls": []},  # at least one call
        {"tool_calls": [call("get_weather", {"city": "Oslo"})]},  # a required argument missing
        {"tool_calls": [call("get_weather", {"city": "Oslo", "unit": "k"})]},
        {"tool_calls": [call("nope", {})]},  # not an offered tool
        {"tool_calls": [call("tree-walk", {"label": "a", "kids": [{"label": 5, "kids": []}]})]},  # $ref re-pointed
        {"tool_calls": [{**call("ping", {}), "extra": 1}]},
        {"response": "hello"},  # text is not allowed when a call is required
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_auto_allows_text_and_parallel_false_allows_one_call():
    schema = tool_calls_schema(TOOLS, mode="auto", parallel=False)
    jsonschema.validate({"response": "It is sunny."}, schema)
    jsonschema.validate({"tool_calls": [call("ping", {})]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [call("ping", {}), call("ping", {})]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "x", "tool_calls": [call("ping", {})]}, schema)


def test_the_schema_converts_to_a_grammar_llama_cpp_reads():
    for mode in ("auto", "required"):
        for parallel in (True, False):
            gbnf = schema_gbnf(tool_calls_schema(TOOLS, mode=mode, parallel=parallel))
            check_gbnf(gbnf)
            assert '"\\"tool_calls\\""' in gbnf and ('"\\"response\\""' in gbnf) == (mode == "auto")


def test_no_tools_is_refused():
    with pytest.raises(InvalidGrammar):
        tool_calls_schema((), mode="required", parallel=True)


# ---------------------------------------------------------------------------------------------
# The instruction and the rendering

OPENAI_TOOLS = (
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping"}},
)
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "-3 C, snow"},
]


def render(template, messages, tools=None):
    return render_chat(template, messages, model_name="m", bos_token="<s>", eos_token="</s>", tools=tools)


def test_the_instruction_lists_the_tools_and_the_reply_for_each_choice():
    auto = tool_instruction(ToolPrompt(OPENAI_TOOLS, required=False))
    lines = auto.splitlines()
    listed = [json.loads(line) for line in lines if line.startswith('{"name"')]
    assert listed == [
        {"name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER},
        {"name": "ping", "description": "", "parameters": {"type": "object"}},
    ]
    assert '{"response": "<your answer>"}' in auto and "one call or more" in auto
    required = tool_instruction(ToolPrompt(OPENAI_TOOLS, required=True, parallel=False))
    assert "You must call a tool" in required and "exactly one call" in required and '"response"' not in required
    named = tool_instruction(ToolPrompt(OPENAI_TOOLS[:1], required=True, function="get_weather"), list_tools=False)
    assert "You must call the tool get_weather" in named and '"name": "get_weather"' in named
    assert "description" not in named  # the template lists the tools itself


def test_builtin_template_gets_the_instruction_and_tool_traffic_as_text():
    gemma = ChatTemplate("builtin", name="gemma")
    text = render(gemma, [{"role": "system", "content": "Be brief."}, *HISTORY], ToolPrompt(OPENAI_TOOLS, required=False))
    # gemma has no system turn: llama.cpp merges it into the first user turn, instruction included
    assert text.startswith("<start_of_turn>user\nBe brief.\n\nYou can call these tools")
    assert '<start_of_turn>model\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}]}<end_of_turn>' in text
    assert "<start_of_turn>user\nTool result (call_1, get_weather): -3 C, snow<end_of_turn>" in text
    assert text.endswith("<start_of_turn>model\n")


def test_without_tools_a_plain_chat_renders_as_before():
    chatml = ChatTemplate("builtin", name="chatml")
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render(chatml, messages) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"


def test_tool_traffic_without_tools_is_still_rendered_as_text():
    chatml = ChatTemplate("builtin", name="chatml")
    text = render(chatml, HISTORY)  # tool_choice none: history only, no instruction
    assert "You can call" not in text
    assert "<|im_start|>user\nTool result (call_1, get_weather): -3 C, snow<|im_end|>" in text


NATIVE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}{% endfor %}"
    "{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }} {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}<assistant>"


def test_a_jinja_template_that_renders_tools_gets_them_as_they_are():
    assert jinja_renders_tools(NATIVE) and not jinja_renders_tools(PLAIN)
    text = render(ChatTemplate("config", jinja=NATIVE), HISTORY, ToolPrompt(OPENAI_TOOLS, required=True))
    assert text.startswith("<tools>get_weather;ping;</tools><system>You must call a tool.")
    assert "description" not in text  # listed by the template, not by the instruction
    assert 'CALL get_weather {"city": "Oslo", "unit": "c"}' in text  # arguments as an object
    assert "<tool>RESULT call_1 -3 C, snow</tool>" in text


def test_a_jinja_template_that_does_not_gets_the_generic_text():
    text = render(ChatTemplate("config", jinja=PLAIN), HISTORY, ToolPrompt(OPENAI_TOOLS, required=False))
    assert text.startswith("<system>You can call these tools (functions), given as JSON:\n{\"name\": \"get_weather\"")
    assert "<user>Tool result (call_1, get_weather): -3 C, snow</user>" in text


def test_a_native_template_that_refuses_a_conversation_gets_the_generic_text():
    one_call_only = NATIVE.replace(
        "{% if m.tool_calls %}",
        "{% if m.tool_calls and m.tool_calls | length > 1 %}{{ raise_exception('one call at a time') }}{% endif %}"
        "{% if m.tool_calls %}")
    assert jinja_renders_tools(one_call_only)
    two = {**HISTORY[1], "tool_calls": HISTORY[1]["tool_calls"] * 2}
    text = render(ChatTemplate("config", jinja=one_call_only), [HISTORY[0], two], ToolPrompt(OPENAI_TOOLS, required=False))
    assert text.startswith("<system>You can call these tools")  # listed by the instruction, not the template
    assert '<assistant>{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, {"name"' in text


def test_a_template_that_fails_a_probe_is_not_native():
    assert not jinja_renders_tools("{{ raise_exception('no tools here') }}")


# ---------------------------------------------------------------------------------------------
# With llama.cpp: random weights, constrained to the reply


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    try:
        path = write_model(tmp_path_factory.mktemp("tools") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", path, n_ctx=1024, parallel=1, max_queue=4, n_threads=2))
    yield reg
    reg.stop_all()


def generate(registry, grammar, seed):
    engine = registry.get("tiny")
    req = GenerationRequest(tuple(engine.model.tokenize("Call a tool:")), 600,
                            SamplingParams.with_overrides(seed=seed, grammar=grammar))
    out, done = "", None
    for ev in engine.submit(req).events():
        if isinstance(ev, Delta):
            out += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        elif isinstance(ev, Done):
            done = ev
    return out, done


LOOKUP = {
    "type": "object",
    "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}, "exact": {"type": "boolean"}},
    "required": ["ids", "exact"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("parallel", [False, True])
def test_random_weights_write_calls_whose_arguments_validate(registry, seed, parallel):
    # Bounded arguments (no free string, no open array), so a reply completes well within the limit.
    tools = (ToolSpec("get_weather", WEATHER), ToolSpec("look-up", LOOKUP))
    schema = tool_calls_schema(tools, mode="required", parallel=parallel)
    grammar = build_grammar(registry.get("tiny").model, schema=schema)
    text, done = generate(registry, grammar, seed)
    if parallel and done.finish_reason == "length":  # an open list of calls may run on: it opens as one
        assert text.startswith('{"tool_calls"'), text
        return
    assert done.finish_reason == "stop", text
    reply = json.loads(text)
    jsonschema.validate(reply, schema)
    assert len(reply["tool_calls"]) >= 1 and (parallel or len(reply["tool_calls"]) == 1)
    for c in reply["tool_calls"]:
        jsonschema.validate(c["arguments"], {"get_weather": WEATHER, "look-up": LOOKUP}[c["name"]])


@pytest.mark.parametrize("seed", range(2))
def test_random_weights_under_auto_write_a_call_or_text(registry, seed):
    schema = tool_calls_schema((ToolSpec("get_weather", WEATHER),), mode="auto", parallel=False)
    text, done = generate(registry, build_grammar(registry.get("tiny").model, schema=schema), seed)
    if done.finish_reason == "length":  # free text may run on: it still opens as the reply
        assert text.startswith("{"), text
        return
    jsonschema.validate(json.loads(text), schema)
