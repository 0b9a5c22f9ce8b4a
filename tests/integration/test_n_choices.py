"""n choices, echo and suffix against the real server (model `m`: parallel 4, no FIM tokens), with the
official openai SDK; every answer's signature verified with the key from /v1/keys.

Requests are sent as exact bytes where a signature is checked, since the response signature binds the
request body's digest (see test_trust_e2e.py).
"""

from __future__ import annotations

import datetime
import json

import pytest
import requests
from appliance_it import assert_error

from attestation import signing

pytestmark = pytest.mark.integration

MAX_AGE = datetime.timedelta(minutes=5)
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def pk(server):
    keys = server.get("/v1/keys").json()
    return signing.public_key_from_b64(keys["public_key"])


def send(server, target: str, body: dict) -> tuple[requests.Response, bytes, signing.RequestInfo]:
    raw_body = json.dumps(body).encode()
    r = requests.post(server.url + target, data=raw_body, headers={"Content-Type": "application/json"}, timeout=120)
    return r, r.content, signing.RequestInfo("POST", target, raw_body)  # a stream read to its end


def verified(pk, server, target: str, body: dict):
    """Send, verify the signature (a stream's whole chain and final checkpoint), return (status, parsed)."""
    r, raw, info = send(server, target, body)
    common = dict(request=info, status=r.status_code, headers=dict(r.headers), max_age=MAX_AGE)
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        v = signing.verify_stream(pk, transcript=raw, **common)
        chunks = [json.loads(e[len(b"data: "):]) for e in v.events if e.startswith(b"data: {")]
        return r.status_code, (chunks, v)
    signing.verify_response(pk, body=raw, **common)
    return r.status_code, r.json()


def test_n_choices_with_the_openai_client(server, client):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, seed=11, temperature=0.9)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.finish_reason in ("stop", "length") for c in r.choices)
    # Choice i is the text that seed + i gives alone; usage counts the prompt once.
    alone = [client.completions.create(model="m", prompt=PROMPT, max_tokens=8, seed=11 + i, temperature=0.9)
             for i in range(3)]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert r.usage.prompt_tokens == alone[0].usage.prompt_tokens
    assert r.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    again = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, seed=11, temperature=0.9)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]

    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                          n=2, temperature=0)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: alike


def test_n_choices_streamed_with_the_openai_client(client):
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    usages = []
    for chunk in client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, seed=5, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert sorted(finishes) == [0, 1, 2] and len(usages) == 1
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, n=3, seed=5)
    assert [texts[i] for i in range(3)] == [c.text for c in whole.choices]
    assert usages[0].completion_tokens == whole.usage.completion_tokens

    roles, contents = {}, {}
    for chunk in client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                                n=2, seed=5, stream=True):
        for c in chunk.choices:
            if c.delta.role:
                roles[c.index] = c.delta.role
            contents[c.index] = contents.get(c.index, "") + (c.delta.content or "")
    assert roles == {0: "assistant", 1: "assistant"} and set(contents) == {0, 1}


def test_usage_counts_the_prompt_once_and_signatures_verify(server, pk):
    body = {"model": "m", "prompt": PROMPT + " a place nobody asked about", "max_tokens": 6, "n": 4,
            "ignore_eos": True, "seed": 3}
    status, obj = verified(pk, server, "/v1/completions", body)
    assert status == 200 and len(obj["choices"]) == 4
    u = obj["usage"]
    assert u["completion_tokens"] == 24 and u["total_tokens"] == u["prompt_tokens"] + 24
    assert obj["timings"]["prompt_n"] == u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]
    assert obj["timings"]["predicted_n"] == 24

    status, (chunks, v) = verified(pk, server, "/v1/completions", {**body, "stream": True})
    assert status == 200
    assert v.usage is not None and v.usage["completion_tokens"] == 24 and v.usage["prompt_tokens"] == u["prompt_tokens"]
    last_finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(last_finish) == 4 and v.finish_reason == last_finish[-1] == "length"
    assert sorted({c["choices"][0]["index"] for c in chunks if c["choices"]}) == [0, 1, 2, 3]

    status, (chunks, v) = verified(pk, server, "/v1/chat/completions", {
        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "n": 2, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert status == 200 and v.usage is not None and v.finish_reason in ("stop", "length")
    assert [c for c in chunks if not c["choices"]][0]["usage"] == v.usage


def test_echo(server, client, pk):
    r = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, echo=True, n=2, temperature=0)
    plain = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, temperature=0)
    assert [c.text for c in r.choices] == [PROMPT + plain.choices[0].text] * 2
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt=PROMPT, max_tokens=5, echo=True, temperature=0, stream=True) if c.choices)
    assert streamed == PROMPT + plain.choices[0].text
    status, obj = verified(pk, server, "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 3, "echo": True})
    assert status == 200 and obj["choices"][0]["text"].startswith(PROMPT)


BAD = [
    ("n-zero", "/v1/completions", {"n": 0}, "n", None),
    ("n-over-slots", "/v1/completions", {"n": 5}, "n", None),
    ("n-over-slots-stream", "/v1/completions", {"n": 5, "stream": True}, "n", None),
    ("n-over-slots-chat", "/v1/chat/completions", {"n": 5}, "n", None),
    ("n-too-big", "/v1/completions", {"n": 1000}, "n", None),
    ("n-string", "/v1/completions", {"n": "2"}, "n", None),
    ("best-of-not-n", "/v1/completions", {"n": 2, "best_of": 3}, "best_of", None),
    ("echo-logprobs", "/v1/completions", {"echo": True, "logprobs": 2}, "echo", None),
    ("suffix-without-fim", "/v1/completions", {"suffix": "\n    return x"}, "suffix", "fim_not_supported"),
    ("suffix-without-fim-stream", "/v1/completions", {"suffix": "", "stream": True}, "suffix", "fim_not_supported"),
]


@pytest.mark.parametrize("case, path, extra, param, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_400_in_the_openai_shape_and_the_server_serves_on(server, pk, case, path, extra, param, code):
    base = {"model": "m", "max_tokens": 3}
    base.update({"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]})
    r, raw, info = send(server, path, {**base, **extra})
    err = assert_error(r, 400, "invalid_request_error", param=param)
    if code is not None:
        assert err["code"] == code
    signing.verify_response(pk, request=info, status=400, headers=dict(r.headers), body=raw, max_age=MAX_AGE)
    ok = server.post("/v1/completions", json={"model": "m", "prompt": PROMPT, "max_tokens": 2, "n": 2})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
