"""Function tools on the Responses API against spec/openapi.yaml, in-process on the fake engine: request
bodies the spec and the server agree on, and every answer (JSON, each stream event, items, errors)
checked against the spec as it arrives (conftest.SpecClient) and parsed by the official SDK's models.
The fake engine replays a fixed reply, standing in for the model the grammar holds to the generic
format; the prompts it is given are compared with the chat route's for the same conversation."""

from __future__ import annotations

import json

import pytest
from openai.types.responses import Response, ResponseItemList, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import FakeRegistry

TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
CHAT_TOOLS = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items() if k != "type"}}]
BODY = {"model": "tiny", "input": "Weather in Oslo?"}
CALL_REPLY = ('{"tool_calls": [{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]}')
TWO_CALLS = ('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}, ',
             '{"name": "get_weather", "arguments": {"city": "Bergen"}}]}')
TEXT_REPLY = ('{"response": "Hel', 'lo \\u00e9"}')
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def registry() -> FakeRegistry:
    """The tier's model with room for the tool instruction (one fake token per character)."""
    reg = FakeRegistry()
    reg.add("tiny", n_ctx=4096)
    return reg


def _call(call_id: str = "call_1", arguments: str = '{"city": "Oslo"}') -> dict:
    return {"type": "function_call", "call_id": call_id, "name": "get_weather", "arguments": arguments}


def _result(call_id: str = "call_1", output: object = "sunny") -> dict:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


CASES = [
    ({"tools": TOOLS}, True),
    ({"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False}, True),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_weather"}}, True),
    ({"tools": TOOLS, "tool_choice": "none"}, True),
    ({"tools": [{**TOOLS[0], "strict": False}, {"type": "function", "name": "b", "description": None,
                                                 "parameters": None, "strict": None}]}, True),
    ({"tools": TOOLS, "stream": True}, True),
    ({"tools": [{"type": "function", "name": "has space"}]}, False),
    ({"tools": [{"type": "function", "name": "a", "parameters": []}]}, False),
    ({"tools": [{"type": "function"}]}, False),
    ({"tools": [{"type": "function", "function": {"name": "a"}}]}, False),  # chat's nested shape
    ({"tools": [{"type": "web_search"}]}, False),
    ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, False),
    ({"tools": [{"type": "mcp", "server_label": "x", "server_url": "https://x"}]}, False),
    ({"tools": [*TOOLS, {"type": "web_search"}]}, False),
    ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, False),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}}, False),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, False),
    ({"tools": TOOLS, "tool_choice": "maybe"}, False),
    ({"tools": TOOLS, "parallel_tool_calls": 1}, False),
    ({"tool_choice": {"type": "function", "name": "get_weather"}}, False),
    ({"tools": [], "tool_choice": "required"}, False),
    ({"input": [{"role": "user", "content": "Hi"}, _call(), _result()], "tools": TOOLS}, True),
    ({"input": [_call(), _result(output=[{"type": "input_text", "text": "sun"}, {"type": "input_text", "text": "ny"}])]},
     True),
    ({"input": [{**_call(), "id": "fc_client", "status": "completed"}, {**_result(), "id": "x", "status": "completed"}]},
     True),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, False),
    ({"input": [{**_call(), "arguments": {"city": "Oslo"}}]}, False),
    ({"input": [{**_call(), "name": ""}]}, False),
    ({"input": [_call(), {"type": "function_call_output", "call_id": "call_1"}]}, False),
    ({"input": [_call(), _result(output=[{"type": "input_file", "file_id": "f"}])]}, False),
    ({"input": [_call(), _result(output=5)]}, False),
]


@pytest.mark.parametrize("extra, valid", CASES, ids=[json.dumps(c[0])[:70] for c in CASES])
def test_tool_request_schema_agrees_with_the_server(api, spec, registry, extra, valid):
    registry.engine("tiny").PIECES = CALL_REPLY
    body = {**BODY, **extra}
    assert spec.request_validator("/v1/responses", "POST").is_valid(body) == valid, body
    r = api.post("/v1/responses", body)
    assert r.status == (200 if valid else 400), r.json
    if not valid:
        assert r.json["error"]["param"] in ("tools", "tool_choice", "input", "parallel_tool_calls"), r.json


@pytest.mark.parametrize("body, param, says", [
    ({"input": [_result()]}, "input", "call_1"),  # no call before it
    ({"input": [_result(), _call()]}, "input", "call_1"),  # its call comes after it
    ({"input": [_call("call_1"), _result("call_2")]}, "input", "call_2"),
    ({"input": [_call(arguments="{city: Oslo}")]}, "input", "JSON"),
    ({"input": [_call(arguments="")]}, "input", "JSON"),
    ({"tools": [*TOOLS, TOOLS[0]]}, "tools", "unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_news"}}, "tool_choice", "get_news"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object", "not": {"required": ["a"]}}}]},
     "tools", "not"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "text", "tools"),
])
def test_schema_valid_bodies_the_server_refuses_name_the_field(api, spec, body, param, says):
    """What a JSON schema cannot say: a result's call must come first, arguments must be JSON, names
    must be unique and known, a parameters schema must be enforceable, no other output constraint."""
    body = {**BODY, **body}
    assert spec.request_validator("/v1/responses", "POST").is_valid(body), body
    r = api.post("/v1/responses", body)
    assert r.status == 400 and r.json["error"]["param"] == param, r.json
    assert says in r.json["error"]["message"], r.json


def test_tool_choice_none_sends_the_prompt_without_tools(api, registry):
    plain = api.post("/v1/responses", BODY).json
    none = api.post("/v1/responses", {**BODY, "tools": TOOLS, "tool_choice": "none"}).json
    engine = registry.engine("tiny")
    assert engine.submitted[-1].prompt == engine.submitted[-2].prompt
    assert engine.submitted[-1].sampling.grammar is None
    assert none["output"] == [{**none["output"][0], "type": "message"}] and plain["tools"] == []
    assert none["tool_choice"] == "none" and none["tools"][0]["name"] == "get_weather"


def test_a_call_is_a_function_call_item_and_the_prompt_is_the_chat_routes(api, registry):
    registry.engine("tiny").PIECES = CALL_REPLY
    r = api.post("/v1/responses", {**BODY, "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False})
    assert r.status == 200
    obj = Response.model_validate(r.json)
    assert obj.status == "completed" and obj.output_text == ""
    (call,) = obj.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Oslo"}
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    assert obj.tool_choice == "required" and obj.parallel_tool_calls is False
    assert [t.model_dump(exclude_none=True) for t in obj.tools] == [{**TOOLS[0], "strict": True}]
    # the same prompt and grammar the chat route builds for the same conversation and tools
    engine = registry.engine("tiny")
    ours = engine.submitted[-1]
    chat = api.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": BODY["input"]}],
                                             "tools": CHAT_TOOLS, "tool_choice": "required",
                                             "parallel_tool_calls": False})
    assert chat.status == 200 and chat.json["choices"][0]["finish_reason"] == "tool_calls"
    theirs = engine.submitted[-1]
    assert ours.prompt == theirs.prompt and ours.sampling.grammar.gbnf == theirs.sampling.grammar.gbnf


def test_parallel_calls_are_items_in_order(api, registry):
    registry.engine("tiny").PIECES = TWO_CALLS
    r = api.post("/v1/responses", {**BODY, "tools": TOOLS})
    calls = r.json["output"]
    assert [json.loads(c["arguments"])["city"] for c in calls] == ["Oslo", "Bergen"]
    assert len({c["call_id"] for c in calls}) == len({c["id"] for c in calls}) == 2


def test_a_named_function_is_forced_and_shown(api, registry):
    registry.engine("tiny").PIECES = CALL_REPLY
    r = api.post("/v1/responses", {**BODY, "tools": [*TOOLS, {"type": "function", "name": "get_time"}],
                                   "tool_choice": {"type": "function", "name": "get_weather"}})
    assert r.json["tool_choice"] == {"type": "function", "name": "get_weather"}
    grammar = registry.engine("tiny").submitted[-1].sampling.grammar.gbnf
    assert "get_weather" in grammar and "get_time" not in grammar  # only the named one can be called


@pytest.mark.parametrize("pieces, max_tokens, status, text", [
    (TEXT_REPLY, None, "completed", "Hello é"),
    (TEXT_REPLY, 1, "incomplete", "Hel"),  # a text reply cut short: its text so far, as streamed
    (CALL_REPLY, 1, "incomplete", CALL_REPLY[0]),  # a call cut short: its raw text
])
def test_a_text_reply_is_a_message_streamed_or_not(api, registry, pieces, max_tokens, status, text):
    registry.engine("tiny").PIECES = pieces
    body = {**BODY, "tools": TOOLS, "max_output_tokens": max_tokens}
    whole = api.post("/v1/responses", body).json
    assert whole["status"] == status and [o["type"] for o in whole["output"]] == ["message"]
    assert whole["output"][0]["content"][0]["text"] == text
    r = api.post("/v1/responses", {**body, "stream": True})
    events = [EVENTS.validate_python(e) for e in r.events[:-1]]
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done", f"response.{status}"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.output_text == text
    if pieces is TEXT_REPLY and max_tokens is None:
        assert n == 2  # the text as it was decoded, not at the end


def test_a_streamed_call_has_openais_events(api, registry):
    registry.engine("tiny").PIECES = TWO_CALLS
    r = api.post("/v1/responses", {**BODY, "tools": TOOLS, "stream": True})
    assert r.status == 200 and r.events[-1] == "[DONE]"
    raw = r.events[:-1]
    assert [e["sequence_number"] for e in raw] == list(range(len(raw)))
    events = [EVENTS.validate_python(e) for e in raw]
    per_call = ["response.output_item.added", "response.function_call_arguments.delta",
                "response.function_call_arguments.done", "response.output_item.done"]
    assert [e.type for e in events] == ["response.created", "response.in_progress", *per_call, *per_call,
                                        "response.completed"]
    final = events[-1].response
    for i, call in enumerate(final.output):
        added, delta, done, item_done = events[2 + 4 * i: 6 + 4 * i]
        assert added.output_index == delta.output_index == done.output_index == item_done.output_index == i
        assert added.item.status == "in_progress" and added.item.arguments == "" and added.item.id == call.id
        assert added.item.call_id == call.call_id and delta.item_id == done.item_id == call.id
        assert delta.delta == done.arguments == call.arguments and item_done.item == call
    assert json.loads(final.output[1].arguments) == {"city": "Bergen"}
    assert api.get(f"/v1/responses/{final.id}").json["output"] == raw[-1]["response"]["output"]


def test_a_result_continues_through_previous_response_id_as_chat_renders_it(api, registry):
    engine = registry.engine("tiny")
    engine.PIECES = CALL_REPLY
    first = api.post("/v1/responses", {**BODY, "tools": TOOLS, "tool_choice": "required"}).json
    (call,) = first["output"]
    engine.PIECES = TEXT_REPLY
    second = api.post("/v1/responses", {"model": "tiny", "previous_response_id": first["id"], "tools": TOOLS,
                                        "input": [_result(call["call_id"], '{"sky": "clear"}')]})
    assert second.status == 200, second.json
    assert second.json["output"][0]["content"][0]["text"] == "Hello é"
    page = api.get(f"/v1/responses/{second.json['id']}/input_items", query_string="order=asc").json
    items = page["data"]
    ResponseItemList.model_validate(page)
    assert [i["type"] for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1] == call and items[2]["call_id"] == call["call_id"] and items[2]["id"].startswith("fco_")
    # the prompt is the chat route's: the call as an assistant's tool call, the result as a tool message
    ours = engine.submitted[-1].prompt
    chat = api.post("/v1/chat/completions", {"model": "tiny", "tools": CHAT_TOOLS, "messages": [
        {"role": "user", "content": BODY["input"]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["call_id"], "type": "function", "function": {"name": "get_weather", "arguments": call["arguments"]}}]},
        {"role": "tool", "tool_call_id": call["call_id"], "content": '{"sky": "clear"}'},
    ]})
    assert chat.status == 200 and engine.submitted[-1].prompt == ours
    # an unknown call id is refused even with the history there
    r = api.post("/v1/responses", {"model": "tiny", "previous_response_id": first["id"], "input": [_result("call_x")]})
    assert r.status == 400 and r.json["error"]["param"] == "input"


def test_a_conversation_keeps_calls_and_results(api, registry):
    engine = registry.engine("tiny")
    engine.PIECES = CALL_REPLY
    cid = api.post("/v1/conversations", {"items": [{"role": "user", "content": "Hi"}]}).json["id"]
    first = api.post("/v1/responses", {**BODY, "conversation": cid, "tools": TOOLS, "tool_choice": "required"}).json
    call = first["output"][0]
    engine.PIECES = ("Fine.",)
    second = api.post("/v1/responses", {"model": "tiny", "conversation": cid, "input": [_result(call["call_id"])]})
    assert second.status == 200, second.json
    items = api.get(f"/v1/conversations/{cid}/items", query_string="order=asc").json["data"]
    assert [i["type"] for i in items] == ["message", "message", "function_call", "function_call_output", "message"]
    assert items[2] == call
    assert api.get(f"/v1/conversations/{cid}/items/{items[3]['id']}").json == items[3]
    # items appended by hand: stored as given, the arguments checked to be JSON
    r = api.post(f"/v1/conversations/{cid}/items", {"items": [_call("call_9"), _result("call_9", "rain")]})
    assert r.status == 200 and [i["type"] for i in r.json["data"]] == ["function_call", "function_call_output"]
    r = api.post(f"/v1/conversations/{cid}/items", {"items": [_call("call_8", arguments="{")]})
    assert r.status == 400 and r.json["error"]["param"] == "items"
