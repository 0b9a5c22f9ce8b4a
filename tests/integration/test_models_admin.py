"""Loading and unloading models at run time, while another model keeps serving."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from appliance_it import assert_error, sha256_file, sse_events

pytestmark = pytest.mark.integration


def test_load_second_model_while_first_streams_then_unload(start_server, model_files):
    server = start_server(models={"a": model_files.main}, name="admin")
    try:
        _scenario(server, model_files)
    finally:
        server.stop()


def _scenario(server, model_files):
    # A long stream on model a, read by a thread that timestamps every chunk.
    chunk_times: list[float] = []
    stream_result: dict = {}

    def consume() -> None:
        try:
            r = requests.post(
                server.url + "/v1/completions",
                json={"model": "a", "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True,
                      "seed": 3, "stream": True, "stream_options": {"include_usage": True}},
                stream=True, timeout=120, headers={"Connection": "close"},
            )
            stream_result["status"] = r.status_code
            events = []
            for ev in sse_events(r.iter_lines()):
                chunk_times.append(time.monotonic())
                events.append(ev)
            stream_result["events"] = events
        except BaseException as e:
            stream_result["error"] = e

    reader = threading.Thread(target=consume)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while len(chunk_times) < 5:
            assert time.monotonic() < deadline and reader.is_alive(), f"the stream did not start: {stream_result}"
            time.sleep(0.01)

        # Load b while a streams; /health keeps answering meanwhile.
        load_result: dict = {}

        def load() -> None:
            load_result["resp"] = server.post(
                "/load_model", json={"model_name": "b", "model_path": str(model_files.other), "n_ctx": 1024, "parallel": 2}
            )

        loader = threading.Thread(target=load)
        t_load = time.monotonic()
        loader.start()
        health_latencies = []
        while loader.is_alive():
            t0 = time.monotonic()
            h = server.get("/health", timeout=5)
            health_latencies.append(time.monotonic() - t0)
            assert h.status_code == 200
            time.sleep(0.02)
        loader.join()
        t_loaded = time.monotonic()
        r = load_result["resp"]
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "loaded"
        assert body["model"]["name"] == "b" and body["model"]["state"] == "ready"
        assert body["model"]["n_ctx"] == 1024 and body["model"]["slots"] == 2
        assert body["model"]["sha256"] == sha256_file(model_files.other)
        assert max(health_latencies, default=0) < 1.0, health_latencies

        # The stream on a kept flowing during the load and after it.
        assert reader.is_alive(), "the stream on a ended before b finished loading (make it longer)"
        during = [t for t in chunk_times if t_load <= t <= t_loaded]
        n_after = len(chunk_times)
        time.sleep(0.2)
        assert len(chunk_times) > n_after, "the stream on a stalled after the load"
        print(f"load took {t_loaded - t_load:.2f}s with {len(during)} chunks of a streamed meanwhile")

        # Generate from b while a is still streaming.
        g = server.post("/v1/completions", json={"model": "b", "prompt": "Hello", "max_tokens": 8, "seed": 1})
        assert g.status_code == 200, g.text
        assert g.json()["model"] == "b" and g.json()["usage"]["completion_tokens"] == 8
        # Different weights: b's text differs from a's for the same request.
        ga = server.post("/v1/completions", json={"model": "a", "prompt": "Hello", "max_tokens": 8, "seed": 1})
        assert ga.status_code == 200 and ga.json()["choices"][0]["text"] != g.json()["choices"][0]["text"]
    finally:
        reader.join(120)

    assert "error" not in stream_result, stream_result
    assert stream_result["status"] == 200
    events = stream_result["events"]
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 1500

    ids = {m["id"] for m in server.get("/v1/models").json()["data"]}
    assert ids == {"a", "b"}
    with server.openai() as c:
        assert {m.id for m in c.models.list()} == {"a", "b"}

    # Loading the same name again is a conflict, and does not disturb the loaded one.
    dup = server.post("/load_model", json={"model_name": "b", "model_path": str(model_files.other)})
    assert_error(dup, 409, "invalid_request_error", code="conflict", param="model_name")

    # Unload b: gone from the listings, requests for it are 404, a still serves.
    u = server.post("/unload_model", json={"model_name": "b"})
    assert u.status_code == 200, u.text
    assert u.json() == {"status": "unloaded", "model": {"name": "b"}}
    assert {m["id"] for m in server.get("/v1/models").json()["data"]} == {"a"}
    assert "b" not in {m["name"] for m in server.get("/status").json()["models"]}
    gone = server.post("/v1/completions", json={"model": "b", "prompt": "Hello", "max_tokens": 2})
    assert_error(gone, 404, "invalid_request_error", code="model_not_found", param="model")
    again = server.post("/unload_model", json={"model_name": "b"})
    assert_error(again, 404, "invalid_request_error", code="model_not_found")
    ok = server.post("/v1/completions", json={"model": "a", "prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text

    # The name can be reused after an unload.
    r = server.post("/load_model", json={"model_name": "b", "model_path": str(model_files.other)})
    assert r.status_code == 200, r.text
    assert server.post("/v1/completions", json={"model": "b", "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_unload_waits_for_in_flight_request(start_server, model_files):
    """Unloading a model lets its running request finish (the engine drains before it is freed)."""
    server = start_server(models={"a": model_files.main}, name="unload-drain")
    try:
        result: dict = {}

        def run() -> None:
            result["resp"] = server.post(
                "/v1/completions", json={"model": "a", "prompt": "Go", "max_tokens": 400, "ignore_eos": True, "seed": 1}
            )

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 20
        while server.status_of("a")["busy_slots"] == 0:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.01)
        u = server.post("/unload_model", json={"model_name": "a"})
        t.join(60)
        assert u.status_code == 200, u.text
        r = result["resp"]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 400
        assert server.get("/v1/models").json()["data"] == []
        # With no model left the appliance is alive but not ready.
        assert server.get("/health").status_code == 200
        assert_error(server.get("/readiness"), 503, "server_error", code="not_ready")
    finally:
        server.stop()
