"""Tool calling through the real server on real weights (Gemma 3 270M, llama.cpp's built-in gemma
template: no tool format of its own, so the generic one) with the official openai SDK.

Whatever a 270M model makes of the instruction, the grammar holds its reply to the generic format:
a `tool_calls` answer must name an offered function with arguments valid against its schema, and
the SDK's stream accumulator must put the streamed calls back together. The tool schemas bound their
strings so a reply completes well within the token limit.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import openai
import pytest
from appliance_it import CLOCK, WEATHER, Server

pytestmark = pytest.mark.integration

GEMMA = "gemma3-270m"
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "The current time in a timezone.",
                                      "parameters": CLOCK}},
]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
CALL_ID = re.compile(r"^call_[0-9a-f]{24}$")


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={GEMMA: real_model}, config="[model_defaults]\nn_ctx = 2048\nparallel = 1\n",
                          name="gemma-tools")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gemma: Server):
    with gemma.openai() as c:
        yield c


def valid_calls(calls, allowed=SCHEMAS) -> list[tuple[str, dict]]:
    """Each call's (name, arguments), checked: an offered function, a fresh id, arguments valid."""
    assert calls, "no tool calls"
    out = []
    for c in calls:
        assert c.type == "function" and CALL_ID.match(c.id), c
        assert c.function.name in allowed, c.function.name
        arguments = json.loads(c.function.arguments)
        jsonschema.validate(arguments, allowed[c.function.name])
        out.append((c.function.name, arguments))
    assert len({c.id for c in calls}) == len(calls)
    return out


def test_required_gives_one_valid_call(client):
    done = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                          parallel_tool_calls=False, temperature=0, max_tokens=200)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    assert len(valid_calls(choice.message.tool_calls)) == 1


def test_required_with_parallel_calls_and_sampling(client):
    for seed in (1, 2):
        done = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                              temperature=0.8, seed=seed, max_tokens=400)
        choice = done.choices[0]
        if choice.finish_reason == "length":  # an open list of calls may run on: cut short, it is raw text
            assert choice.message.content.startswith('{"tool_calls"') and not choice.message.tool_calls
            continue
        assert choice.finish_reason == "tool_calls", choice.message
        valid_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called(client):
    done = client.chat.completions.create(
        model=GEMMA, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0, max_tokens=200, parallel_tool_calls=False)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    (name, _), = valid_calls(choice.message.tool_calls, {"get_time": CLOCK})
    assert name == "get_time"


def test_auto_gives_a_valid_call_or_text(client):
    done = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, temperature=0, max_tokens=300)
    choice = done.choices[0]
    assert choice.finish_reason in ("tool_calls", "stop"), choice.message
    if choice.finish_reason == "tool_calls":
        assert choice.message.content is None
        valid_calls(choice.message.tool_calls)
    else:
        assert isinstance(choice.message.content, str) and not choice.message.tool_calls
        assert not choice.message.content.lstrip().startswith('{"response"')  # the text, not the JSON


def test_a_tool_result_round_trip(client):
    first = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=200)
    message = first.choices[0].message
    (call,) = message.tool_calls
    history = [
        *ASK,
        message.model_dump(exclude_none=True),  # as the SDK returns it: content null, tool_calls
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})},
    ]
    assert history[1]["role"] == "assistant" and "content" not in history[1]
    answer = client.chat.completions.create(model=GEMMA, messages=history, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=60)
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls
    # the call and its result were in the prompt (tool_choice none: no instruction, so only they add to it)
    plain = client.chat.completions.create(model=GEMMA, messages=ASK, temperature=0, max_tokens=1)
    assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 20


def test_streamed_tool_calls_through_the_sdk_accumulator(client):
    with client.chat.completions.stream(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                        parallel_tool_calls=False, temperature=0, max_tokens=200) as stream:
        kinds = [event.type for event in stream]
        done = stream.get_final_completion()
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(valid_calls(choice.message.tool_calls)) == 1
    assert "tool_calls.function.arguments.done" in kinds and "content.delta" not in kinds
    # the same request unstreamed writes the same call (greedy), ids aside
    plain = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=200)
    assert valid_calls(plain.choices[0].message.tool_calls) == valid_calls(choice.message.tool_calls)


def test_streamed_chunks_with_create(client):
    chunks = list(client.chat.completions.create(
        model=GEMMA, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0, max_tokens=200, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [t for d in deltas for t in (d.tool_calls or [])]
    assert pieces, [(d.content, c.choices[0].finish_reason) for c, d in zip(chunks, deltas)]
    assert pieces[0].id and pieces[0].function.name == "get_weather" and pieces[0].type == "function"
    arguments = "".join(p.function.arguments or "" for p in pieces if p.index == 0)
    jsonschema.validate(json.loads(arguments), WEATHER)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_none_is_plain_text(client):
    done = client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=30)
    choice = done.choices[0]
    assert choice.finish_reason in ("stop", "length") and choice.message.content and not choice.message.tool_calls
    without = client.chat.completions.create(model=GEMMA, messages=ASK, temperature=0, max_tokens=30)
    assert choice.message.content == without.choices[0].message.content  # none: the tools are not offered


def test_an_unknown_function_named_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=GEMMA, messages=ASK, tools=TOOLS, max_tokens=5,
                                       tool_choice={"type": "function", "function": {"name": "get_news"}})
    assert e.value.body["param"] == "tool_choice" and "get_news" in e.value.body["message"]
