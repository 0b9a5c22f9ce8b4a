"""Chat and completions through the official openai client, streaming and not, on the shared server."""

from __future__ import annotations

import math
import threading

import pytest

pytestmark = pytest.mark.integration

MODEL = "m"
MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three rivers in Europe."},
]
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
TIMING_KEYS = {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms", "predicted_per_second", "queued_ms"}


def extra(obj, key):
    """A field the openai types do not declare (kept by the client as an extra attribute)."""
    return obj.to_dict().get(key)


def check_usage(usage, completion_tokens: int | None = None) -> None:
    assert usage is not None
    assert usage.prompt_tokens > 0
    if completion_tokens is not None:
        assert usage.completion_tokens == completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def check_timings(timings: dict | None, predicted_n: int) -> None:
    assert timings is not None and TIMING_KEYS <= set(timings), timings
    assert timings["predicted_n"] == predicted_n
    assert timings["prompt_ms"] >= 0 and timings["predicted_ms"] >= 0 and timings["queued_ms"] >= 0


def test_openai_client_placeholder_key_on_open_server(server):
    # Raw HTTP first, to show the status: without a token 200, with an unknown one it should be the same.
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
                    headers={"Authorization": "Bearer none"})
    assert r.status_code == 200, r.text
    # And the official client exactly as documented: api_key="none".
    with server.openai() as c:
        r = c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert r.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------
# Chat


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, seed=7)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    check_usage(r.usage, 12)
    check_timings(extra(r, "timings"), 12)


def test_chat_streaming_matches_non_streaming(client):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=20, seed=11, temperature=0.9)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks, "no chunks"
    ids = {c.id for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"

    # include_usage: one last chunk with no choices and the usage; the others carry none.
    final = chunks[-1]
    assert final.choices == []
    check_usage(final.usage, 20)
    assert all(c.usage is None for c in chunks[:-1])

    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0] is chunks[-2]
    assert finishing[0].choices[0].finish_reason == "length"
    check_timings(extra(finishing[0], "timings"), 20)

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_chat_streaming_without_include_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, seed=1, stream=True))
    assert chunks[-1].choices and chunks[-1].choices[0].finish_reason == "length"
    # Without include_usage the usage rides on the finishing chunk (llama.cpp server style).
    check_usage(chunks[-1].usage, 5)


def test_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, seed=3)
    assert r.choices[0].finish_reason == "length"
    check_usage(r.usage, 5)
    # max_completion_tokens wins over the deprecated max_tokens when both are given.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, max_tokens=9, seed=3)
    check_usage(r.usage, 3)


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=6, seed=5, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    for lp in content:
        assert isinstance(lp.token, str)
        assert lp.logprob <= 0.0 and math.isfinite(lp.logprob)
        assert isinstance(lp.bytes, list) and all(0 <= b < 256 for b in lp.bytes)
        assert len(lp.top_logprobs) == 3
        values = [t.logprob for t in lp.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values)
        assert lp.logprob <= values[0] + 1e-6  # nothing is likelier than the most likely token
    # The tokens' bytes spell the content.
    joined = b"".join(bytes(lp.bytes) for lp in content).decode("utf-8", "replace")
    assert joined == choice.message.content

    # logprobs without top_logprobs: the chosen token's logprob and no alternatives.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, seed=5, logprobs=True)
    assert len(r.choices[0].logprobs.content) == 3
    assert all(lp.top_logprobs == [] for lp in r.choices[0].logprobs.content)


def test_chat_logprobs_streaming(client):
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_completion_tokens=5, seed=5, logprobs=True, top_logprobs=2, stream=True
        )
    )
    lps = [lp for c in chunks if c.choices and c.choices[0].logprobs for lp in c.choices[0].logprobs.content]
    assert len(lps) == 5
    assert all(len(lp.top_logprobs) == 2 for lp in lps)


# ---------------------------------------------------------------------------------------------
# Completions


def test_completion_non_streaming(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, seed=1)
    assert r.object == "text_completion"
    assert r.id.startswith("cmpl-")
    assert r.model == MODEL
    choice = r.choices[0]
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    check_usage(r.usage, 10)
    check_timings(extra(r, "timings"), 10)


def test_completion_default_max_tokens_is_16(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, seed=1)
    check_usage(r.usage, 16)


def test_completion_streaming_matches_non_streaming(client):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=24, seed=21, temperature=1.0)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" for c in chunks)
    final = chunks[-1]
    assert final.choices == []
    check_usage(final.usage, 24)
    finishing = chunks[-2]
    assert finishing.choices[0].finish_reason == "length"
    check_timings(extra(finishing, "timings"), 24)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text


def test_completion_token_id_prompt(client):
    r = client.completions.create(model=MODEL, prompt=[128000, 791, 4062, 14198], max_tokens=4, seed=2)
    assert r.usage.prompt_tokens == 4
    check_usage(r.usage, 4)


def test_completion_logprobs_shape(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, seed=4, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert n == 6
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert all(v <= 0.0 and math.isfinite(v) for v in lp.token_logprobs)
    for top in lp.top_logprobs:
        # A dict token -> logprob; two tokens with the same visible text would collapse into one key.
        assert 1 <= len(top) <= 2
        assert all(v <= 0.0 for v in top.values())
    assert lp.text_offset[0] == len(PROMPT)  # OpenAI counts offsets from the start of the prompt
    assert lp.text_offset == sorted(lp.text_offset)
    for i in range(1, n):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])


# ---------------------------------------------------------------------------------------------
# Stop strings


def _pick_stop(text: str, at: float, length: int = 3) -> tuple[str, int]:
    """A substring of `text` starting around the fraction `at`, and where it first occurs."""
    assert len(text) > 2 * length + 2, f"text too short to pick a stop string from: {text!r}"
    for start in range(int(len(text) * at), len(text) - length):
        candidate = text[start : start + length]
        if candidate.strip() and "\ufffd" not in candidate:
            return candidate, text.find(candidate)
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_completion_stop_string_and_list(client, stream):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=40, seed=99, temperature=1.0)
    full = client.completions.create(**args).choices[0].text

    def run(stop):
        if not stream:
            r = client.completions.create(**args, stop=stop)
            return r.choices[0].text, r.choices[0].finish_reason
        chunks = list(client.completions.create(**args, stop=stop, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason][-1]

    stop, cut = _pick_stop(full, 0.5)
    text, finish = run(stop)
    assert (text, finish) == (full[:cut], "stop"), (full, stop)

    # A list: the earliest match of any stop string wins; strings that never occur are harmless.
    early, early_cut = _pick_stop(full, 0.25)
    text, finish = run(["\x00never\x00", stop, early])
    assert (text, finish) == (full[: min(cut, early_cut)], "stop"), (full, stop, early)

    # Nothing matches: the full text, finish_reason "length".
    assert run(["\x00never\x00"]) == (full, "length")


def test_chat_stop_string(client):
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=40, seed=123, temperature=1.0)
    full = client.chat.completions.create(**args).choices[0].message.content
    stop, cut = _pick_stop(full, 0.6)
    r = client.chat.completions.create(**args, stop=stop)
    assert r.choices[0].message.content == full[:cut]
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 40

    chunks = list(client.chat.completions.create(**args, stop=[stop], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[:cut]
    assert chunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_text(client):
    args = dict(model=MODEL, prompt="In a hole in the ground there lived", max_tokens=32, seed=1234, temperature=1.0)
    first = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args).choices[0].text == first
    other = client.completions.create(**{**args, "seed": 4321}).choices[0].text
    assert other != first  # the seed matters (gibberish from 128k tokens never collides by chance)


def test_same_seed_same_text_under_concurrency(client, server):
    args = dict(model=MODEL, prompt="It was a bright cold day in April", max_tokens=48, seed=2024, temperature=1.0)
    reference = client.completions.create(**args).choices[0].text

    results: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            with server.openai() as c:
                barrier.wait(timeout=30)
                if i == 0:
                    r = c.completions.create(**args)
                elif i % 2:
                    r = c.completions.create(model=MODEL, prompt=f"Different prompt number {i}", max_tokens=64, seed=i)
                else:
                    r = c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"Say {i}"}], max_tokens=64, seed=i,
                        temperature=1.5,
                    )
                    results[i] = r.choices[0].message.content
                    return
                results[i] = r.choices[0].text
        except BaseException as e:
            errors.append(e)

    for _round in range(2):
        results.clear()
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(results) == 8
        assert results[0] == reference

    # And streamed alongside others: still the same text.
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference


# ---------------------------------------------------------------------------------------------
# The other seed service's shapes


def test_second_seed_chat_shape(server):
    r = server.post(
        "/chat/completions",
        json={"model-name": MODEL, "prompt": "What is async/await?", "max-token": 5, "device": "cpu"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 5


def test_second_seed_models_listing(server):
    for path in ("/models", "/v1/models"):
        r = server.get(path)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list"
        ids = [m["id"] for m in body["data"]]
        assert MODEL in ids
        assert all(m["object"] == "model" and m["owned_by"] for m in body["data"])


def test_openai_models_list(client):
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_unprefixed_completions_route(server):
    r = server.post("/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "seed": 1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 3
