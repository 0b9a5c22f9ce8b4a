"""Bad inputs: each gets the right status and an OpenAI-shaped error, and nothing gets wedged."""

from __future__ import annotations

import json

import pytest
import requests
from appliance_it import assert_error

pytestmark = pytest.mark.integration

MAX_BODY = 2048
SMALL_CTX = 256
INVALID = "invalid_request_error"


@pytest.fixture(scope="module")
def err_server(start_server, model_files):
    """Model `m` (defaults), `small` (n_ctx 256, one slot) and `noqueue` (one slot, no queue); request
    bodies capped at 2048 bytes."""
    config = f"""
[limits]
max_body_bytes = {MAX_BODY}

[[models]]
name = "m"
path = "{model_files.main}"

[[models]]
name = "small"
path = "{model_files.main}"
n_ctx = {SMALL_CTX}
parallel = 1

[[models]]
name = "noqueue"
path = "{model_files.main}"
n_ctx = 512
parallel = 1
max_queue = 0
"""
    server = start_server(config=config, name="errors")
    # /readiness is 200 once one model is ready: wait for both.
    import time

    deadline = time.monotonic() + 60
    while any(server.status_of(n)["state"] != "ready" for n in ("m", "small", "noqueue")):
        assert time.monotonic() < deadline, server.get("/status").text
        time.sleep(0.1)
    yield server
    server.stop()


def _post(server, path: str, body=None, *, raw: bytes | None = None, content_type: str | None = "application/json"):
    headers = {"Connection": "close"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    data = raw if raw is not None else json.dumps(body).encode()
    return requests.post(server.url + path, data=data, headers=headers, timeout=60)


C = {"model": "m", "prompt": "Hello", "max_tokens": 2}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}

# (id, path, body or raw bytes, content type, status, type, code, param); ... means "not checked".
CASES = [
    ("malformed-json", "/v1/completions", b'{"model": "m", "prompt": ', "application/json", 400, INVALID, None, None),
    ("invalid-utf8", "/v1/completions", b'{"model": "m", "prompt": "\xff\xfe"}', "application/json", 400, INVALID, None, None),
    ("empty-body", "/v1/completions", b"", "application/json", 400, INVALID, None, None),
    ("body-is-array", "/v1/completions", [1, 2, 3], "application/json", 400, INVALID, None, None),
    ("body-is-string", "/v1/chat/completions", "hello", "application/json", 400, INVALID, None, None),
    ("body-is-null", "/v1/completions", None, "application/json", 400, INVALID, None, None),
    ("missing-model", "/v1/completions", {"prompt": "Hi"}, "application/json", 400, INVALID, None, "model"),
    ("missing-prompt", "/v1/completions", {"model": "m"}, "application/json", 400, INVALID, None, "prompt"),
    ("max-tokens-string", "/v1/completions", {**C, "max_tokens": "ten"}, "application/json", 400, INVALID, None, "max_tokens"),
    ("max-tokens-bool", "/v1/completions", {**C, "max_tokens": True}, "application/json", 400, INVALID, None, "max_tokens"),
    ("max-tokens-zero", "/v1/completions", {**C, "max_tokens": 0}, "application/json", 400, INVALID, None, "max_tokens"),
    ("max-tokens-huge", "/v1/completions", {**C, "max_tokens": 10**9}, "application/json", 400, INVALID, None, "max_tokens"),
    ("temperature-5", "/v1/completions", {**C, "temperature": 5}, "application/json", 400, INVALID, None, "temperature"),
    ("temperature-string", "/v1/chat/completions", {**CHAT, "temperature": "0.5"}, "application/json", 400, INVALID, None, "temperature"),
    ("top-p-negative", "/v1/completions", {**C, "top_p": -0.1}, "application/json", 400, INVALID, None, "top_p"),
    ("seed-string", "/v1/completions", {**C, "seed": "abc"}, "application/json", 400, INVALID, None, "seed"),
    ("unknown-model", "/v1/completions", {**C, "model": "nope"}, "application/json", 404, INVALID, "model_not_found", "model"),
    ("unknown-model-chat", "/v1/chat/completions", {**CHAT, "model": "nope"}, "application/json", 404, INVALID, "model_not_found", "model"),
    ("n-0", "/v1/completions", {**C, "n": 0}, "application/json", 400, INVALID, None, "n"),
    ("n-over-slots-chat", "/v1/chat/completions", {**CHAT, "n": 100}, "application/json", 400, INVALID, None, "n"),
    ("empty-messages", "/v1/chat/completions", {**CHAT, "messages": []}, "application/json", 400, INVALID, None, "messages"),
    ("bad-role", "/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "application/json", 400, INVALID, None, "messages"),
    ("messages-not-list", "/v1/chat/completions", {**CHAT, "messages": "Hello"}, "application/json", 400, INVALID, None, "messages"),
    ("tools", "/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "application/json", 400, INVALID, None, ...),
    ("top-logprobs-without-logprobs", "/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "application/json", 400, INVALID, None, ...),
    ("top-logprobs-too-many", "/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "application/json", 400, INVALID, None, "top_logprobs"),
    ("completion-logprobs-too-many", "/v1/completions", {**C, "logprobs": 21}, "application/json", 400, INVALID, None, "logprobs"),
    ("stream-options-without-stream", "/v1/completions", {**C, "stream_options": {"include_usage": True}}, "application/json", 400, INVALID, None, ...),
    ("empty-stop", "/v1/completions", {**C, "stop": ""}, "application/json", 400, INVALID, None, "stop"),
    ("too-many-stops", "/v1/completions", {**C, "stop": [f"s{i}" for i in range(9)]}, "application/json", 400, INVALID, None, "stop"),
    ("echo-logprobs", "/v1/completions", {**C, "echo": True, "logprobs": 1}, "application/json", 400, INVALID, None, "echo"),
    ("token-out-of-vocab", "/v1/completions", {**C, "prompt": [1, 2, 10**7]}, "application/json", 400, INVALID, None, "prompt"),
    ("empty-token-list", "/v1/completions", {**C, "prompt": []}, "application/json", 400, INVALID, None, "prompt"),
    ("request-n-ctx-too-big", "/completions", {**C, "n_ctx": 10**6}, "application/json", 400, INVALID, None, "n_ctx"),
    ("text-plain", "/v1/completions", C, "text/plain", 415, INVALID, "unsupported_media_type", None),
    ("no-content-type", "/v1/completions", C, None, 415, INVALID, "unsupported_media_type", None),
    ("form-encoded", "/load_model", b"model_name=x&model_path=y", "application/x-www-form-urlencoded", 415, INVALID, "unsupported_media_type", None),
    ("too-large", "/v1/completions", {**C, "prompt": "x" * (MAX_BODY + 100)}, "application/json", 413, INVALID, "payload_too_large", None),
    ("too-large-chat", "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "y" * 5000}]}, "application/json", 413, INVALID, "payload_too_large", None),
    ("deep-nesting", "/v1/completions", {**C, "metadata": json.loads("[" * 40 + "]" * 40)}, "application/json", 400, INVALID, None, None),
    ("very-deep-nesting", "/v1/completions", b"[" * 1000 + b"]" * 1000, "application/json", 400, INVALID, None, None),
    ("load-missing-fields", "/load_model", {"model_name": "x"}, "application/json", 400, INVALID, None, "model_path"),
    ("load-bad-name", "/load_model", {"model_name": "../etc", "model_path": "/x.gguf"}, "application/json", 400, INVALID, None, "model_name"),
    ("load-no-such-file", "/load_model", {"model_name": "x", "model_path": "/nonexistent/model.gguf"}, "application/json", 400, INVALID, None, "model_path"),
    ("load-directory", "/load_model", {"model_name": "x", "model_path": "/"}, "application/json", 400, INVALID, None, "model_path"),
    ("load-parallel-zero", "/load_model", {"model_name": "x", "model_path": "/x.gguf", "parallel": 0}, "application/json", 400, INVALID, None, "parallel"),
    ("load-duplicate", "/load_model", {"model_name": "m", "model_path": "/x.gguf"}, "application/json", 409, INVALID, "conflict", "model_name"),
    ("unload-unknown", "/unload_model", {"model_name": "nope"}, "application/json", 404, INVALID, "model_not_found", ...),
]


@pytest.mark.parametrize(
    "path,body,ctype,status,type_,code,param", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_table(err_server, path, body, ctype, status, type_, code, param):
    raw = body if isinstance(body, bytes) else None
    r = _post(err_server, path, body, raw=raw, content_type=ctype)
    assert_error(r, status, type_, code=code, param=param)
    assert r.headers.get("X-Request-Id")


def _chunked(*parts: bytes):
    def gen():
        yield from parts  # a generator body makes requests send Transfer-Encoding: chunked

    return gen()


def test_chunked_request_body(err_server):
    body = json.dumps(C).encode()
    r = requests.post(err_server.url + "/v1/completions", data=_chunked(body[:10], body[10:]),
                      headers={"Content-Type": "application/json", "Connection": "close"}, timeout=60)
    assert r.request.headers.get("Transfer-Encoding") == "chunked"
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_oversized_chunked_body(err_server):
    """A chunked upload has no Content-Length: the limit must still hold while reading."""
    parts = [b'{"model": "m", "prompt": "'] + [b"z" * 400] * 10 + [b'"}']
    r = requests.post(err_server.url + "/v1/completions", data=_chunked(*parts),
                      headers={"Content-Type": "application/json", "Connection": "close"}, timeout=60)
    # 413 once bodies are read while counting; 411 would do too, for a server that refuses chunked bodies.
    assert r.status_code in (411, 413), r.text
    assert_error(r, r.status_code, INVALID)


def test_unknown_route(err_server):
    for path in ("/v2/completions", "/nothing/here", "/v1/completions/extra"):
        assert_error(err_server.get(path), 404, INVALID, code="not_found")


@pytest.mark.parametrize("method,path", [("DELETE", "/v1/models"), ("GET", "/v1/completions"), ("PUT", "/load_model"),
                                         ("POST", "/health"), ("POST", "/status")])
def test_wrong_method(err_server, method, path):
    r = requests.request(method, err_server.url + path, timeout=30, json={}, headers={"Connection": "close"})
    assert_error(r, 405, INVALID, code="method_not_allowed")
    assert r.headers.get("Allow"), r.headers


def test_prompt_longer_than_context(err_server):
    prompt = " x" * 300  # one token each: 300 tokens (+ BOS) > 256
    r = _post(err_server, "/v1/completions", {"model": "small", "prompt": prompt, "max_tokens": 4})
    err = assert_error(r, 400, INVALID, code="context_length_exceeded", param="prompt")
    assert str(SMALL_CTX) in err["message"]
    # The same prompt fits the default model.
    ok = _post(err_server, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 4})
    assert ok.status_code == 200, ok.text
    # Chat too.
    r = _post(err_server, "/v1/chat/completions", {"model": "small", "messages": [{"role": "user", "content": prompt}]})
    assert_error(r, 400, INVALID, code="context_length_exceeded", param="messages")  # chat has no `prompt` field
    # Streaming: refused before any event is sent, with a status, not an SSE error.
    r = _post(err_server, "/v1/completions", {"model": "small", "prompt": prompt, "stream": True})
    assert_error(r, 400, INVALID, code="context_length_exceeded")


def test_generation_stops_at_the_context(err_server):
    """A prompt that fits but leaves less room than max_tokens: cut at the context, finish_reason length."""
    prompt = " x" * 200
    r = _post(err_server, "/v1/completions", {"model": "small", "prompt": prompt, "max_tokens": 500, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["prompt_tokens"] > 200 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] <= SMALL_CTX


def test_overloaded_model_answers_503(err_server):
    """One slot, no queue: while it is busy, the next request is refused at once with 503 and Retry-After."""
    import threading
    import time

    result = {}

    def long_request():
        result["r"] = _post(err_server, "/v1/completions",
                            {"model": "noqueue", "prompt": "Go", "max_tokens": 400, "ignore_eos": True})

    t = threading.Thread(target=long_request)
    t.start()
    try:
        deadline = time.monotonic() + 20
        while err_server.status_of("noqueue")["busy_slots"] != 1:
            assert time.monotonic() < deadline and t.is_alive(), result
            time.sleep(0.01)
        t0 = time.monotonic()
        r = _post(err_server, "/v1/completions", {"model": "noqueue", "prompt": "Me too", "max_tokens": 2})
        assert time.monotonic() - t0 < 5  # refused, not queued
        assert_error(r, 503, "server_error", code="overloaded")
        assert r.headers.get("Retry-After") == "1"
        # Other models are unaffected.
        assert _post(err_server, "/v1/completions", C).status_code == 200
    finally:
        t.join(60)
    assert result["r"].status_code == 200, result["r"].text
    assert result["r"].json()["usage"]["completion_tokens"] == 400
    # And once the slot is free, the model takes requests again.
    assert _post(err_server, "/v1/completions", {"model": "noqueue", "prompt": "Now", "max_tokens": 2}).status_code == 200


def test_concurrent_loads_of_one_name(err_server, model_files):
    """Two loads of the same name at once: exactly one wins, the other is a 409 (loading or ready)."""
    import threading

    barrier = threading.Barrier(2)
    results = []

    def load():
        barrier.wait(10)
        results.append(_post(err_server, "/load_model", {"model_name": "twin", "model_path": str(model_files.other)}))

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(r.status_code for r in results) == [200, 409], [r.text for r in results]
    assert_error(next(r for r in results if r.status_code == 409), 409, INVALID, code="conflict", param="model_name")
    assert err_server.status_of("twin")["state"] == "ready"
    assert _post(err_server, "/unload_model", {"model_name": "twin"}).status_code == 200


def test_load_non_gguf_file(err_server, model_files):
    junk = model_files.dir / "junk.bin"
    junk.write_bytes(b"this is not a gguf file at all" * 100)
    r = _post(err_server, "/load_model", {"model_name": "junk", "model_path": str(junk)})
    err = assert_error(r, 400, INVALID, param="model_path")
    assert "GGUF" in err["message"]
    assert "junk" not in {m["name"] for m in err_server.get("/status").json()["models"]}


def test_load_truncated_gguf_then_keep_serving(err_server, model_files):
    truncated = model_files.dir / "truncated.gguf"
    with open(model_files.main, "rb") as f:
        truncated.write_bytes(f.read(1_000_000))
    r = _post(err_server, "/load_model", {"model_name": "trunc", "model_path": str(truncated)})
    assert_error(r, 400, INVALID, param="model_path")
    # The failure is visible in /status, not in the listings, and nothing else is affected.
    entry = err_server.status_of("trunc")
    assert entry["state"] == "failed" and entry["error"]
    assert "trunc" not in {m["id"] for m in err_server.get("/v1/models").json()["data"]}
    assert_error(_post(err_server, "/v1/completions", {**C, "model": "trunc"}), 404, INVALID, code="model_not_found")
    assert err_server.get("/readiness").status_code == 200
    ok = _post(err_server, "/v1/completions", C)
    assert ok.status_code == 200, ok.text
    # The name of a failed load can be reused with a good file.
    r = _post(err_server, "/load_model", {"model_name": "trunc", "model_path": str(model_files.other)})
    assert r.status_code == 200, r.text
    assert _post(err_server, "/v1/completions", {**C, "model": "trunc"}).status_code == 200
    assert _post(err_server, "/unload_model", {"model_name": "trunc"}).status_code == 200


def test_header_only_gguf(err_server, model_files):
    """Valid magic and header, nothing after it: llama.cpp refuses, the server says 400."""
    stub = model_files.dir / "stub.gguf"
    with open(model_files.main, "rb") as f:
        stub.write_bytes(f.read(24))
    r = _post(err_server, "/load_model", {"model_name": "stub", "model_path": str(stub)})
    assert_error(r, 400, INVALID, param="model_path")


def test_nothing_wedged_after_bad_inputs(err_server):
    """Runs last in this module: after every bad input above, normal requests still work."""
    assert err_server.get("/health").status_code == 200
    assert err_server.get("/readiness").status_code == 200
    for name in ("m", "small", "noqueue"):
        s = err_server.status_of(name)
        assert s["state"] == "ready" and s["busy_slots"] == 0 and s["queue_depth"] == 0, s
    with err_server.openai() as c:
        r = c.completions.create(model="m", prompt="Hello again", max_tokens=5, seed=1)
        assert r.usage.completion_tokens == 5
        chunks = list(c.chat.completions.create(model="small", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert err_server.proc.poll() is None


def test_readiness_503_without_models(start_server, model_files):
    server = start_server(wait="health", name="no-models")
    try:
        r = server.get("/readiness")
        assert_error(r, 503, "server_error", code="not_ready")
        assert r.headers.get("Retry-After") == "1"
        assert server.get("/health").json() == {"status": "ok"}
        assert server.get("/v1/models").json() == {"object": "list", "data": []}
        assert server.get("/status").json()["models"] == []
        assert_error(_post(server, "/v1/completions", C), 404, INVALID, code="model_not_found")
        # Ready as soon as a model is loaded.
        r = _post(server, "/load_model", {"model_name": "m", "model_path": str(model_files.main)})
        assert r.status_code == 200, r.text
        r = server.get("/readiness")
        assert r.status_code == 200 and r.json() == {"status": "ready", "models": ["m"]}
    finally:
        server.stop()
