"""Stop strings, prefix matching and request validation: the logic around the engine, no llama.cpp."""

import pytest

from appliance.engine.slots import common_prefix, scan_stops
from appliance.web.errors import BadRequest
from appliance.web.schemas import ChatRequest, CompletionRequest, parse


@pytest.mark.parametrize(
    "text, emitted, stops, expected",
    [
        ("hello world", 0, ("world",), (6, 6)),
        ("hello wor", 0, ("world",), (None, 6)),  # "wor" could still become "world": held back
        ("hello", 0, ("xyz",), (None, 5)),
        ("abcSTOPdef", 3, ("STOP", "de"), (3, 3)),  # the earliest match wins
        ("aaa", 0, ("aab",), (None, 1)),
        ("text ends with s", 10, ("s!",), (None, 15)),
    ],
)
def test_scan_stops(text, emitted, stops, expected):
    assert scan_stops(text, emitted, stops) == expected


def test_scan_stops_never_moves_backwards():
    cut, safe = scan_stops("abcd", 4, ("dz",))
    assert cut is None and safe == 4


@pytest.mark.parametrize("a, b, n", [([], [1], 0), ([1, 2, 3], [1, 2, 4], 2), ([1, 2], [1, 2, 3], 2), ([5], [6], 0)])
def test_common_prefix(a, b, n):
    assert common_prefix(a, b) == n


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "m", "prompt": "x", "max_tokens": "10"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"model": "m", "prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ({"model": "m", "prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
        ({"prompt": "x"}, "model"),
    ],
)
def test_completion_validation_names_the_param(body, param):
    with pytest.raises(BadRequest) as e:
        parse(CompletionRequest, body)
    assert e.value.param == param, e.value.message
    assert e.value.status == 400


def test_original_appliance_shape_is_accepted():
    r = parse(CompletionRequest, {"model": "llama3-8b", "prompt": "Hello, world!", "max_tokens": 10, "seed": 42, "n_threads": 4, "n_ctx": 512})
    assert (r.n_threads, r.n_ctx, r.seed) == (4, 512, 42)


def test_legacy_chat_shape_is_translated():
    r = parse(ChatRequest, {"model-name": "m", "prompt": "hi", "max-token": 5, "device": "cuda"})
    assert r.model == "m" and r.messages[0].content == "hi" and r.token_limit == 5 and r.device == "cuda"


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": []},
        {"model": "m", "messages": [{"role": "wizard", "content": "x"}]},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
        ["not", "an", "object"],
    ],
)
def test_chat_validation(body):
    with pytest.raises(BadRequest):
        parse(ChatRequest, body)


def test_empty_stop_string_refused():
    r = parse(CompletionRequest, {"model": "m", "prompt": "x", "stop": ["a", ""]})
    with pytest.raises(BadRequest):
        r.stops()


def test_legacy_chat_without_prompt_is_refused():
    with pytest.raises(BadRequest) as e:
        parse(ChatRequest, {"model-name": "m", "max-token": 5})
    assert e.value.param == "prompt"


def test_union_type_tags_do_not_leak_into_errors():
    with pytest.raises(BadRequest) as e:
        parse(CompletionRequest, {"model": "m", "prompt": [1, "a"]})
    assert "[" not in e.value.message.split(":")[0] and not e.value.message.startswith("prompt.str")
    assert e.value.param == "prompt"


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(
    "text", ["", "Hello", ' "quoted" \\ back', "é ü 日本 😀", "\x00\x1f\u2028 ctrl", '"finish_reason":"stop"', "\x00appliance-text\x00"]
)
def test_token_chunk_template_gives_the_same_bytes_as_the_whole_object(chat, text):
    from appliance.web.openai import sse_event, text_chunk_encoder

    base = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "m\"odel é", "system_fingerprint": None}
    choice = (
        {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
        if chat
        else {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
    )
    assert text_chunk_encoder(base, chat=chat)(text) == sse_event({**base, "choices": [choice]})
