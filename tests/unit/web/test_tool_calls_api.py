"""Tool calling on /v1/chat/completions in-process: the request's validation (400s naming the field),
what reaches the engine (the fake registry runs the real schema checks and conversion, not
llama.cpp), the reply read as tool calls or text, and the stream as the official SDK's accumulator
reads it. The fake engine replays a fixed reply, standing in for the constrained model."""

from __future__ import annotations

import json
import re

import falcon.testing
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from appliance.engine.events import Done, Timings, Usage
from appliance.settings import Settings
from appliance.web import openai as wire
from appliance.web.app import create_app
from appliance.web.errors import BadRequest
from appliance.web.schemas import MAX_TOOLS, ChatRequest, parse
from attestation import signing
from tests.conftest import FakeGrammar, FakeRegistry
from tests.conftest import SignedClient as Client

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "ping", "strict": True}},
]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS}
CALL_REPLY = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Os', 'lo", "unit": "c"}}, ',
              '{"name": "ping", "arguments": {}}]}')
TEXT_REPLY = ('{"response": "', "It is \\u00e9", "t\\u00e9 and ", '\\"cold\\"\\', 'n."}')
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("tiny", n_ctx=4096)
    return reg


@pytest.fixture
def app(registry) -> falcon.App:
    app, _ = create_app(Settings.model_validate({"limits": {"max_body_bytes": 4 << 20}}), models=registry)
    return app


@pytest.fixture
def api(app) -> Client:
    return Client(app)


def replying(registry: FakeRegistry, pieces: tuple[str, ...]) -> None:
    registry.engine("tiny").PIECES = pieces


# ---------------------------------------------------------------------------------------------
# The request


def fn(name: str, parameters: object = None) -> dict:
    f: dict = {"name": name}
    if parameters is not None:
        f["parameters"] = parameters
    return {"type": "function", "function": f}


@pytest.mark.parametrize("extra, param, says", [
    ({"tools": [fn("get weather")]}, "tools", "should match pattern"),
    ({"tools": [fn("x" * 65)]}, "tools", "should match pattern"),
    ({"tools": [fn("")]}, "tools", "should match pattern"),
    ({"tools": [fn(f"f{i}") for i in range(MAX_TOOLS + 1)]}, "tools", f"at most {MAX_TOOLS} items"),
    ({"tools": [fn("a"), fn("a")]}, "tools", "'a' appears twice"),
    ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools", "'function'"),
    ({"tools": [fn("a", {"type": "integer", "minimum": 0})]}, "tools", "'minimum' is not supported"),
    ({"tools": [fn("a", {"type": "object", "properties": {"x": {"$ref": "https://example.com/s"}}})]}, "tools",
     "only local references"),
    ({"tools": [fn("a", "{}")]}, "tools", "valid dictionary"),
    ({"tools": [fn("a")], "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice",
     "no function named 'b' in tools"),
    ({"tools": None, "tool_choice": {"type": "function", "function": {"name": "b"}}}, "tool_choice", "no function named 'b'"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"tools": [fn("a")], "tool_choice": "sometimes"}, "tool_choice", "'none', 'auto' or 'required'"),
    ({"tools": [fn("a")], "parallel_tool_calls": "yes"}, "parallel_tool_calls", "valid boolean"),
    ({"tools": [fn("a")], "response_format": {"type": "json_object"}}, "response_format", "not together with tools"),
    ({"tools": [fn("a")], "grammar": 'root ::= "a"'}, "grammar", "not together with tools"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "a", "arguments": "{}"}}]}]}, "messages", "only an assistant"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}, "messages", "only a tool message"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "a"}}]}]},
     "messages", "arguments"),
])
def test_bad_tool_fields_are_400s_naming_them(api, extra, param, says):
    with pytest.raises(BadRequest) as e:
        parse(ChatRequest, {**CHAT, **extra})
    assert e.value.param == param and says in e.value.message, e.value.message
    r = api.post("/v1/chat/completions", {**CHAT, **extra})
    assert r.status_code == 400 and r.json["error"]["param"] == param, r.json


def test_what_the_reply_must_be():
    assert parse(ChatRequest, {**CHAT, "tools": None}).tool_use() is None
    assert parse(ChatRequest, {**CHAT, "tools": []}).tool_use() is None
    assert parse(ChatRequest, {**CHAT, "tool_choice": "none"}).tool_use() is None
    auto = parse(ChatRequest, CHAT).tool_use()
    assert auto is not None and auto.mode == "auto" and auto.parallel and auto.function is None
    assert [t["function"]["name"] for t in auto.tools] == ["get_weather", "ping"]
    assert auto.tools[0] == TOOLS[0]  # as sent (for a template that lists tools itself)
    required = parse(ChatRequest, {**CHAT, "tool_choice": "required", "parallel_tool_calls": False}).tool_use()
    assert required is not None and required.mode == "required" and not required.parallel
    named = parse(ChatRequest, {**CHAT, "tool_choice": {"type": "function", "function": {"name": "ping"}}}).tool_use()
    assert named is not None and named.mode == "required" and named.function == "ping" and not named.parallel
    assert [s.name for s in named.specs] == ["ping"] and named.specs[0].parameters == {}


def test_tool_choice_none_leaves_the_output_free_and_other_constraints_allowed(api, registry):
    r = api.post("/v1/chat/completions", {**CHAT, "tool_choice": "none", "response_format": {"type": "json_object"}})
    assert r.status_code == 200, r.json
    assert r.json["choices"][0]["message"] == {"role": "assistant", "content": "Hello, wörld!"}
    grammar = registry.engine("tiny").submitted[-1].sampling.grammar
    assert isinstance(grammar, FakeGrammar) and "tool_calls" not in grammar.gbnf


# ---------------------------------------------------------------------------------------------
# The answer


def test_the_reply_is_held_to_the_tools_and_answered_as_tool_calls(api, registry):
    replying(registry, CALL_REPLY)
    r = api.post("/v1/chat/completions", CHAT)
    assert r.status_code == 200, r.json
    choice = r.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant" and message["content"] is None
    calls = message["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"]
    assert all(CALL_ID.match(c["id"]) for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("ping", {})]
    grammar = registry.engine("tiny").submitted[-1].sampling.grammar
    assert isinstance(grammar, FakeGrammar)
    assert '"\\"get_weather\\""' in grammar.gbnf and '"\\"ping\\""' in grammar.gbnf and '"\\"response\\""' in grammar.gbnf


def test_a_named_function_narrows_the_grammar_to_it(api, registry):
    replying(registry, ('{"tool_calls": [{"name": "ping", "arguments": {}}]}',))
    r = api.post("/v1/chat/completions", {**CHAT, "tool_choice": {"type": "function", "function": {"name": "ping"}}})
    assert r.json["choices"][0]["finish_reason"] == "tool_calls"
    gbnf = registry.engine("tiny").submitted[-1].sampling.grammar.gbnf
    assert '"\\"ping\\""' in gbnf and "get_weather" not in gbnf and '"\\"response\\""' not in gbnf
    assert 'tool-calls ::= "[" space tool-calls-item "]" space' in gbnf  # exactly one call


def test_a_text_reply_is_content(api, registry):
    replying(registry, TEXT_REPLY)
    r = api.post("/v1/chat/completions", CHAT)
    choice = r.json["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": 'It is été and "cold"\n.'}
    assert choice["finish_reason"] == "stop"


def test_a_reply_cut_short_is_its_raw_text_with_finish_length(api, registry):
    replying(registry, CALL_REPLY)
    r = api.post("/v1/chat/completions", {**CHAT, "max_tokens": 2})
    choice = r.json["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": "".join(CALL_REPLY[:2])}


def test_tool_history_reaches_the_prompt(api, registry):
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "-3 C"},
    ]
    r = api.post("/v1/chat/completions", {**CHAT, "messages": history, "tool_choice": "none"})
    assert r.status_code == 200, r.json
    model = registry.engine("tiny").model
    tail = "<|im_start|>user\nTool result (call_9, get_weather): -3 C<|im_end|>\n<|im_start|>assistant\n"
    assert list(registry.engine("tiny").submitted[-1].prompt[-len(tail):]) == model.tokenize(tail, add_special=False)


def test_n_choices_are_each_answered(api, registry):
    replying(registry, CALL_REPLY)
    r = api.post("/v1/chat/completions", {**CHAT, "n": 2})
    assert [c["finish_reason"] for c in r.json["choices"]] == ["tool_calls", "tool_calls"]
    ids = [c["id"] for choice in r.json["choices"] for c in choice["message"]["tool_calls"]]
    assert len(set(ids)) == 4


def test_call_ids_come_from_the_injected_source():
    ids = iter(["call_a", "call_b"])
    x = wire.Exchange("chat", "chatcmpl-" + "0" * 32, 0, "tiny", False, call_id=lambda: next(ids))
    done = Done("stop", Usage(3, 4, 0), Timings(prompt_n=3, prompt_ms=1.0, predicted_n=4, predicted_ms=1.0, queued_ms=0.0))
    obj = wire.final_object(x, [wire.Choice("".join(CALL_REPLY), [], done)])
    assert [c["id"] for c in obj["choices"][0]["message"]["tool_calls"]] == ["call_a", "call_b"]


# ---------------------------------------------------------------------------------------------
# Streams


def stream(app: falcon.App, body: dict) -> tuple[list[dict], bytes, falcon.testing.Result]:
    raw_body = json.dumps({**body, "stream": True}).encode()
    r = falcon.testing.TestClient(app).simulate_post("/v1/chat/completions", body=raw_body,
                                                     headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    events = [line[len(b"data: "):] for line in r.content.split(b"\n\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]], raw_body, r


def accumulated(chunks: list[dict]):
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    return state.get_final_completion()


def test_streamed_tool_calls_are_what_the_sdk_accumulates(app, registry):
    replying(registry, CALL_REPLY)
    chunks, raw_body, r = stream(app, {**CHAT, "stream_options": {"include_usage": True}})
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert not any(d.get("content") for d in deltas)  # calls only: no text
    opened = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(o["index"], o["type"], o["function"]["name"]) for o in opened] == [
        (0, "function", "get_weather"), (1, "function", "ping")]
    done = accumulated(chunks)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "c"}), ("ping", {})]
    assert [c.id for c in calls] == [o["id"] for o in opened] and all(CALL_ID.match(c.id) for c in calls)
    assert done.usage is not None and done.usage.completion_tokens == len(CALL_REPLY)
    # the signed stream attests the finish reason the client saw
    key = signing.public_key_from_b64(falcon.testing.TestClient(app).simulate_get("/v1/keys").json["public_key"])
    verified = signing.verify_stream(key, request=signing.RequestInfo("POST", "/v1/chat/completions", raw_body),
                                     status=r.status_code, headers=dict(r.headers), transcript=r.content)
    assert verified.finish_reason == "tool_calls"


def test_a_streamed_text_reply_comes_as_it_is_decoded(app, registry):
    replying(registry, TEXT_REPLY)
    chunks, _, _ = stream(app, CHAT)
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    pieces = [t for t in texts if t]
    assert pieces == ["It is é", "té and ", '"cold"', "\n."]  # an escape cut in two waits for its end
    done = accumulated(chunks)
    assert done.choices[0].message.content == 'It is été and "cold"\n.' and done.choices[0].finish_reason == "stop"
    assert not done.choices[0].message.tool_calls


def test_a_streamed_reply_cut_short_ends_with_length(app, registry):
    replying(registry, CALL_REPLY)
    chunks, _, _ = stream(app, {**CHAT, "max_tokens": 1})
    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    snapshot = state.current_completion_snapshot  # (the SDK's final parse raises on a length finish)
    assert snapshot.choices[0].finish_reason == "length" and snapshot.choices[0].message.content == CALL_REPLY[0]
    assert not snapshot.choices[0].message.tool_calls


def test_streams_that_call_tools_refuse_n_and_logprobs(api):
    r = api.post("/v1/chat/completions", {**CHAT, "stream": True, "n": 2})
    assert r.status_code == 400 and r.json["error"]["param"] == "n"
    r = api.post("/v1/chat/completions", {**CHAT, "stream": True, "logprobs": True})
    assert r.status_code == 400 and r.json["error"]["param"] == "logprobs"
