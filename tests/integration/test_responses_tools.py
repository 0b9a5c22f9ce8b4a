"""Function tools on the Responses API through the real server on real weights (Gemma 3 270M, llama.cpp's
built-in gemma template, so the generic tool-call format, as tests/integration/test_tool_calls.py has
it for chat) with the official openai SDK: forced and named calls, a stream read by the SDK's typed
events and its `responses.stream` helper, a second turn sending the result through
`previous_response_id` and through a conversation, the WebSocket mode, and bad bodies as 400s naming
the field.

Whatever a 270M model makes of the instruction, the grammar holds its reply to the generic format: a
`function_call` must name an offered function with arguments valid against its schema. The schemas
bound their strings so a reply completes well within the token limit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
from appliance_it import CLOCK, WEATHER, Server
from openai.types.responses import Response

pytestmark = pytest.mark.integration

GEMMA = "gemma3-270m"
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The current weather in a city.", "parameters": WEATHER,
     "strict": True},
    {"type": "function", "name": "get_time", "description": "The current time in a timezone.", "parameters": CLOCK,
     "strict": True},
]
ASK = "What is the weather like in Paris right now?"
CALL_ID = re.compile(r"^call_[0-9a-f]{48}$")
ITEM_ID = re.compile(r"^fc_[0-9a-f]{48}$")
FORCED = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False, "temperature": 0,
          "max_output_tokens": 200}


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={GEMMA: real_model}, config="[model_defaults]\nn_ctx = 2048\nparallel = 1\n",
                          name="gemma-responses-tools")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gemma: Server):
    with gemma.openai() as c:
        yield c


def valid_calls(output, allowed=SCHEMAS) -> list[tuple[str, dict]]:
    """Each function_call item's (name, arguments), checked: an offered function, fresh ids, arguments valid."""
    calls = [o for o in output if o.type == "function_call"]
    assert calls and len(calls) == len(output), output
    out = []
    for c in calls:
        assert ITEM_ID.match(c.id) and CALL_ID.match(c.call_id) and c.status == "completed", c
        assert c.name in allowed, c.name
        arguments = json.loads(c.arguments)
        jsonschema.validate(arguments, allowed[c.name])
        out.append((c.name, arguments))
    assert len({c.call_id for c in calls}) == len(calls)
    return out


def _strict(obj) -> Response:
    """The JSON the server sent, validated (not just constructed) by the SDK's own pydantic model."""
    return Response.model_validate(obj.model_dump(mode="json", exclude_unset=True))


def test_required_gives_one_valid_call(client):
    done = client.responses.create(model=GEMMA, input=ASK, **FORCED)
    _strict(done)
    assert done.status == "completed" and done.output_text == ""
    assert len(valid_calls(done.output)) == 1
    assert done.tool_choice == "required" and done.parallel_tool_calls is False
    assert [t.name for t in done.tools] == ["get_weather", "get_time"]
    assert client.responses.retrieve(done.id).output == done.output


def test_a_named_function_is_the_one_called(client):
    done = client.responses.create(model=GEMMA, input=ASK, tools=TOOLS, tool_choice={"type": "function", "name": "get_time"},
                                   temperature=0, max_output_tokens=200)
    (name, _), = valid_calls(done.output, {"get_time": CLOCK})
    assert name == "get_time" and done.tool_choice.name == "get_time"


def test_auto_gives_valid_calls_or_text(client):
    done = client.responses.create(model=GEMMA, input=ASK, tools=TOOLS, temperature=0, max_output_tokens=300)
    assert done.status == "completed", done
    if done.output[0].type == "function_call":
        valid_calls(done.output)
    else:
        (message,) = done.output
        assert message.type == "message" and done.output_text
        assert not done.output_text.lstrip().startswith('{"response"')  # the text, not the JSON


def test_a_streamed_call_through_the_sdks_events_and_helper(client):
    events = list(client.responses.create(model=GEMMA, input=ASK, stream=True, **FORCED))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"], kinds
    added, delta, args_done, item_done, completed = events[2:]
    (call,) = completed.response.output
    assert added.item.type == "function_call" and added.item.status == "in_progress" and added.item.arguments == ""
    assert added.item.id == delta.item_id == args_done.item_id == call.id and added.item.call_id == call.call_id
    assert delta.delta == args_done.arguments == call.arguments and item_done.item == call
    valid_calls(completed.response.output)

    # the SDK's helper: its accumulator, and the arguments parsed for a strict tool
    with client.responses.stream(model=GEMMA, input=ASK, **FORCED) as stream:
        seen = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.done" in seen and "response.output_text.delta" not in seen
    (parsed,) = final.output
    assert parsed.parsed_arguments == json.loads(parsed.arguments)
    # greedy: the stream calls what the same request unstreamed calls, ids aside
    plain = client.responses.create(model=GEMMA, input=ASK, **FORCED)
    assert valid_calls(plain.output) == valid_calls(final.output) == valid_calls(completed.response.output)


def test_the_result_goes_back_through_previous_response_id(client):
    first = client.responses.create(model=GEMMA, input=ASK, **FORCED)
    (call,) = first.output
    result = {"type": "function_call_output", "call_id": call.call_id,
              "output": json.dumps({"temperature": 18, "sky": "clear"})}
    answer = client.responses.create(model=GEMMA, previous_response_id=first.id, input=[result], temperature=0,
                                     max_output_tokens=40)
    _strict(answer)
    assert answer.status in ("completed", "incomplete") and answer.output[0].type == "message" and answer.output_text
    items = list(client.responses.input_items.list(answer.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == call.id and items[1].call_id == items[2].call_id == call.call_id
    assert items[2].output == result["output"]
    # the call and its result were in the prompt (no tools now: no instruction, so only they add to it)
    plain = client.responses.create(model=GEMMA, input=ASK, temperature=0, max_output_tokens=1)
    assert answer.usage.input_tokens > plain.usage.input_tokens + 20
    # the tools may be offered again on that turn: another call, or text
    again = client.responses.create(model=GEMMA, previous_response_id=first.id, input=[result], tools=TOOLS,
                                    temperature=0, max_output_tokens=200)
    assert again.status == "completed" and again.output
    if again.output[0].type == "function_call":
        valid_calls(again.output)


def test_calls_and_results_live_in_a_conversation(client):
    conv = client.conversations.create()
    first = client.responses.create(model=GEMMA, input=ASK, conversation=conv.id, **FORCED)
    (call,) = first.output
    second = client.responses.create(model=GEMMA, conversation=conv.id, temperature=0, max_output_tokens=20,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    assert second.output[0].type == "message"
    items = list(client.conversations.items.list(conv.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output", "message"]
    assert items[1].id == call.id and items[2].call_id == call.call_id and items[3].id == second.output[0].id


def test_the_websocket_mode_calls_tools_too(gemma):
    with openai.OpenAI(base_url=gemma.url + "/v1", api_key="none", max_retries=0) as ws_client:
        with ws_client.responses.connect() as conn:
            conn.response.create(model=GEMMA, input=ASK, **FORCED)
            kinds, done = [], None
            for event in conn:
                kinds.append(event.type)
                if event.type == "error":
                    pytest.fail(f"error event: {event}")
                if event.type in ("response.completed", "response.incomplete"):
                    done = event.response
                    break
    assert done is not None and done.status == "completed"
    assert "response.function_call_arguments.done" in kinds
    valid_calls(done.output)


@pytest.mark.parametrize("kwargs, param, says", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "get_news"}}, "tool_choice", "get_news"),
    ({"tools": [{"type": "web_search"}]}, "tools", "only function tools"),
    ({"tools": [*TOOLS, {"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools", "only function tools"),
    ({"input": [{"type": "function_call_output", "call_id": "call_nowhere", "output": "x"}]}, "input", "call_nowhere"),
    ({"input": [{"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{city: Paris}"}]},
     "input", "not valid JSON"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "text", "tools"),
])
def test_bad_tool_bodies_are_400s_naming_the_field(client, kwargs, param, says):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=GEMMA, **{"input": ASK, "max_output_tokens": 5, **kwargs})
    assert e.value.param == param and says in e.value.body["message"], e.value.body
