"""Tool calling against spec/openapi.yaml: request bodies the spec and the server agree on, and every
answer (JSON, stream chunks, errors) checked against the spec as it arrives (conftest.SpecClient).
The fake engine replays a fixed reply, standing in for the constrained model."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FakeRegistry

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
CALL_REPLY = ('{"tool_calls": [{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]}')
TEXT_REPLY = ('{"response": "Hel', 'lo"}')



@pytest.fixture
def registry() -> FakeRegistry:
    """The tier's model with room for the tool instruction (one fake token per character)."""
    reg = FakeRegistry()
    reg.add("tiny", n_ctx=4096)
    return reg


CASES = [
    ({"tools": TOOLS}, True),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, True),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, True),
    ({"tools": TOOLS, "tool_choice": "none"}, True),
    ({"tool_choice": "auto"}, True),
    ({"tool_choice": "required"}, False),
    ({"tools": [], "tool_choice": "required"}, False),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, False),
    ({"tools": TOOLS, "tool_choice": "maybe"}, False),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, False),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]}, False),
    ({"tools": [{"type": "code_interpreter"}]}, False),
    ({"tools": TOOLS, "parallel_tool_calls": 1}, False),
    # make fuzz (2026-12-07): a stream that calls tools takes no logprobs, which the schema did not say
    ({"tools": TOOLS, "stream": True, "logprobs": True}, False),
    ({"tools": TOOLS, "tool_choice": "required", "stream": True, "logprobs": True}, False),
    ({"tools": TOOLS, "tool_choice": "none", "stream": True, "logprobs": True}, True),
    ({"tools": TOOLS, "stream": True, "logprobs": False}, True),
    ({"tools": TOOLS, "logprobs": True}, True),
    ({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]}, True),
    ({"messages": [{"role": "user", "content": "Hi", "tool_call_id": "call_1"}]}, False),
    ({"messages": [{"role": "tool", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "a", "arguments": "{}"}}]}]}, False),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "a"}}]}]}, False),
]


@pytest.mark.parametrize("extra, valid", CASES, ids=[json.dumps(c[0])[:60] for c in CASES])
def test_tool_request_schema_agrees_with_the_server(api, spec, registry, extra, valid):
    registry.engine("tiny").PIECES = CALL_REPLY
    body = {**CHAT, **extra}
    assert spec.request_validator("/v1/chat/completions", "POST").is_valid(body) == valid, body
    r = api.post("/v1/chat/completions", body)
    assert r.status == (200 if valid else 400), r.json


def test_tool_calls_answer_has_the_spec_shape(api, registry):
    registry.engine("tiny").PIECES = CALL_REPLY
    r = api.post("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "required"})
    assert r.status == 200
    choice = r.json["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.parametrize("reply, finish", [(CALL_REPLY, "tool_calls"), (TEXT_REPLY, "stop")])
def test_tool_streams_have_the_spec_shape(api, registry, reply, finish):
    registry.engine("tiny").PIECES = reply
    r = api.post("/v1/chat/completions", {**CHAT, "tools": TOOLS, "stream": True,
                                          "stream_options": {"include_usage": True}})
    assert r.status == 200 and r.events[-1] == "[DONE]"
    chunks = [c for c in r.events[:-1] if c["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == finish
    calls = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", [])]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    if finish == "tool_calls":
        assert text == "" and calls[0]["function"]["name"] == "get_weather"
        assert json.loads("".join(d["function"]["arguments"] for d in calls)) == {"city": "Oslo"}
    else:
        assert text == "Hello" and calls == []
