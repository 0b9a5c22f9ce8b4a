"""Function tools on the Responses API, the pure parts: the request's tools and tool_choice (the chat
route's ToolUse from the flat shape), items as the chat template's messages, the check that a result
answers a call, the reply read by the chat route's reader, and (in-process) a streamed call and a
streamed text reply as the official SDK's own stream accumulator (`responses.stream`) reads them."""

from __future__ import annotations

import itertools
import json

import falcon.testing
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.errors import BadRequest
from appliance.web.responses import (
    chat_messages,
    function_call_item,
    function_call_output_item,
    message_item,
    tool_output,
    unanswered_output,
)
from appliance.web.schemas import ResponseRequest, parse
from attestation import signing
from tests.conftest import FakeRegistry

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER,
          "strict": True},
         {"type": "function", "name": "ping"}]
BODY = {"model": "tiny", "input": "Weather in Oslo?", "tools": TOOLS}


def ids(prefix: str):
    counter = itertools.count()
    return lambda: f"{prefix}_{next(counter)}"


# ---------------------------------------------------------------------------------------------
# The request


def test_the_flat_tools_become_the_chat_routes_tool_use():
    use = parse(ResponseRequest, BODY).tool_use()
    assert use is not None and use.mode == "auto" and use.function is None and use.parallel
    assert use.tools == (
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                          "parameters": WEATHER, "strict": True}},
        {"type": "function", "function": {"name": "ping"}},
    )
    assert [(s.name, dict(s.parameters)) for s in use.specs] == [("get_weather", WEATHER), ("ping", {})]
    required = parse(ResponseRequest, {**BODY, "tool_choice": "required", "parallel_tool_calls": False}).tool_use()
    assert required is not None and required.mode == "required" and not required.parallel
    named = parse(ResponseRequest, {**BODY, "tool_choice": {"type": "function", "name": "ping"}}).tool_use()
    assert named is not None and named.function == "ping" and not named.parallel and named.mode == "required"
    assert [t["function"]["name"] for t in named.tools] == ["ping"]
    assert parse(ResponseRequest, {**BODY, "tool_choice": "none"}).tool_use() is None
    assert parse(ResponseRequest, {**BODY, "tools": []}).tool_use() is None


def test_the_response_shows_the_tools_and_the_choice_as_given():
    body = parse(ResponseRequest, {**BODY, "tools": [*TOOLS, {"type": "function", "name": "off", "strict": False}],
                                   "tool_choice": {"type": "function", "name": "ping"}})
    assert body.tools_shown() == [
        {"type": "function", "name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER,
         "strict": True},
        {"type": "function", "name": "ping", "description": None, "parameters": None, "strict": True},
        {"type": "function", "name": "off", "description": None, "parameters": None, "strict": False},
    ]
    assert body.tool_choice_shown() == {"type": "function", "name": "ping"}
    assert parse(ResponseRequest, {"model": "m", "input": "x"}).tool_choice_shown() == "auto"


@pytest.mark.parametrize("extra, param, says", [
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tools": [*TOOLS, {"type": "code_interpreter", "container": "c"}]}, "tools", "only function tools"),
    ({"tools": [{"type": "function", "name": "a b"}]}, "tools", "pattern"),
    ({"tools": [{"type": "function", "name": "ping"}, {"type": "function", "name": "ping"}]}, "tools", "'ping' appears twice"),
    ({"tools": [{"type": "function", "name": "a", "parameters": {"type": "integer", "minimum": 0}}]}, "tools",
     "'minimum' is not supported"),
    ({"tool_choice": {"type": "function", "name": "get_news"}}, "tool_choice", "no function named 'get_news'"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice", "no built-in tools"),
    ({"tools": None, "tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "boolean"}}}}, "text", "together with tools"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{'a': 1}"}]}, "input", "not valid JSON"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "image_url": "x"}]}]},
     "input", "'input_image'"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input", "function_call_output"),
])
def test_bad_tool_fields_are_400s_naming_them(extra, param, says):
    with pytest.raises(BadRequest) as e:
        parse(ResponseRequest, {**BODY, **extra})
    assert e.value.param == param and says in e.value.message, e.value.message


def test_text_formats_are_fine_when_no_tool_is_called():
    fmt = {"format": {"type": "json_object"}}
    assert parse(ResponseRequest, {**BODY, "tool_choice": "none", "text": fmt}).output_constraint() is not None
    assert parse(ResponseRequest, {"model": "m", "input": "x", "text": fmt}).output_constraint() is not None


# ---------------------------------------------------------------------------------------------
# Items, for the template and for the check


def test_items_become_the_chat_routes_messages():
    items = [
        message_item("msg_1", "user", "Weather in Oslo and Bergen?"),
        message_item("msg_2", "assistant", "Let me look."),
        function_call_item("fc_1", "call_a", "get_weather", '{"city":"Oslo"}'),
        function_call_item("fc_2", "call_b", "get_weather", '{"city":"Bergen"}'),
        function_call_output_item("fco_1", "call_a", "sunny"),
        function_call_output_item("fco_2", "call_b", [{"type": "input_text", "text": "rain"},
                                                      {"type": "input_text", "text": "y"}]),
        function_call_item("fc_3", "call_c", "ping", "{}"),
        message_item("msg_3", "user", "Thanks"),
    ]
    call = lambda cid, name, args: {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}  # noqa: E731
    assert chat_messages(items) == [
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            call("call_a", "get_weather", '{"city":"Oslo"}'), call("call_b", "get_weather", '{"city":"Bergen"}')]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rainy"},
        {"role": "assistant", "content": "", "tool_calls": [call("call_c", "ping", "{}")]},  # after a result: its own turn
        {"role": "user", "content": "Thanks"},
    ]


def test_a_result_must_answer_a_call_before_it():
    history = [message_item("msg_1", "user", "x"), function_call_item("fc_1", "call_a", "f", "{}")]
    result = function_call_output_item("fco_1", "call_a", "ok")
    assert unanswered_output(history, [result]) is None
    assert unanswered_output([], [function_call_item("fc_2", "call_a", "f", "{}"), result]) is None
    assert unanswered_output([], [result]) == "call_a"
    assert unanswered_output([], [result, function_call_item("fc_2", "call_a", "f", "{}")]) == "call_a"
    assert unanswered_output(history, [function_call_output_item("fco_2", "call_b", "ok")]) == "call_b"
    # the stored history is taken as it is: only what the request adds is checked
    assert unanswered_output([function_call_output_item("fco_3", "call_z", "old")], [result]) == "call_a"
    assert unanswered_output([function_call_output_item("fco_3", "call_z", "old")], []) is None


@pytest.mark.parametrize("text, finish, content, calls, reason", [
    ('{"tool_calls": [{"name": "f", "arguments": {"a": "é"}}]}', "stop", None, [("f", '{"a":"é"}')], "tool_calls"),
    ('{"response": "Hi \\"you\\"\\n"}', "stop", 'Hi "you"\n', None, "stop"),
    ('{"response": "Hi th', "length", "Hi th", None, "length"),  # cut short: the text so far
    ('{"response": "caf\\u00', "length", "caf", None, "length"),  # an escape cut in two is left out
    ('{"tool_calls": [{"name": "f", "argu', "length", '{"tool_calls": [{"name": "f", "argu', None, "length"),
    ("not json", "stop", "not json", None, "stop"),
])
def test_a_reply_is_read_as_the_chat_route_reads_it(text, finish, content, calls, reason):
    reply = tool_output(text, finish, ids("call"))
    assert reply.content == content and reply.finish_reason == reason
    got = None if reply.tool_calls is None else [(c["function"]["name"], c["function"]["arguments"]) for c in reply.tool_calls]
    assert got == calls
    if calls:
        assert [c["id"] for c in reply.tool_calls] == ["call_0"]


# ---------------------------------------------------------------------------------------------
# In-process streams, read by the SDK's accumulator

EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture
def app():
    reg = FakeRegistry()
    reg.add("tiny", n_ctx=4096)
    app, _ = create_app(Settings(), models=reg)
    return app, reg


def _stream(app, body: dict):
    """The events of a streamed response, its signature verified, and what the SDK's helper makes of them."""
    client = falcon.testing.TestClient(app)
    key = signing.public_key_from_b64(client.simulate_get("/v1/keys").json["public_key"])
    raw = json.dumps({**body, "stream": True}).encode()
    r = client.simulate_post("/v1/responses", body=raw, headers={"Content-Type": "application/json"})
    verified = signing.verify_stream(key, request=signing.RequestInfo("POST", "/v1/responses", raw),
                                     status=r.status_code, headers=dict(r.headers), transcript=r.content)
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    state = ResponseStreamState(input_tools=body.get("tools", []), text_format=omit)
    handled = [h for e in events for h in state.handle_event(EVENTS.validate_python(e))]
    completed = [h.response for h in handled if h.type == "response.completed"]
    return events, completed[0] if completed else None, verified


def test_a_streamed_call_is_what_the_sdk_accumulates(app):
    app, reg = app
    reg.engine("tiny").PIECES = ('{"tool_calls": [{"name": "get_weather", "arguments": {"ci', 'ty": "Oslo"}}, ',
                                 '{"name": "ping", "arguments": {}}]}')
    events, done, verified = _stream(app, BODY)
    assert done is not None and done.status == "completed"
    weather, ping = done.output
    assert (weather.type, weather.name, weather.parsed_arguments) == ("function_call", "get_weather", {"city": "Oslo"})
    assert (ping.name, json.loads(ping.arguments)) == ("ping", {})
    assert not any(e["type"].startswith("response.output_text") for e in events)
    assert verified.finish_reason == "tool_calls"  # the signed stream attests what the client saw


def test_a_streamed_text_reply_is_what_the_sdk_accumulates(app):
    app, reg = app
    reg.engine("tiny").PIECES = ('{"response": "', "It is \\u00e9", "t\\u00e9 and ", '\\"cold\\"\\', 'n."}')
    events, done, verified = _stream(app, BODY)
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert deltas == ["It is é", "té and ", '"cold"', "\n."]  # as decoded; an escape cut in two waits for its end
    assert done is not None and done.output_text == 'It is été and "cold"\n.' and done.status == "completed"
    assert verified.finish_reason == "stop"
