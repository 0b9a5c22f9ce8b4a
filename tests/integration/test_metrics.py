"""/metrics after real traffic: the series operators alert on are there and move as they should."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

MODEL = "m"


def scrape(server) -> dict[tuple[str, tuple], float]:
    r = server.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples) -> set[str]:
    return {name for name, _ in samples}


def test_metrics_after_traffic(server):
    before = scrape(server)
    for seed in (1, 2):
        r = server.post("/v1/completions", json={"model": MODEL, "prompt": "Count", "max_tokens": 5, "seed": seed})
        assert r.status_code == 200, r.text
    r = server.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                   "max_tokens": 7, "stream": True}, stream=True)
    assert r.status_code == 200
    assert r.content.rstrip().endswith(b"data: [DONE]")
    missing = server.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"})
    assert missing.status_code == 404
    after = scrape(server)

    for required in (
        "appliance_requests_total",
        "appliance_time_to_first_token_seconds_count",
        "appliance_time_to_first_token_seconds_bucket",
        "appliance_generation_tokens_total",
        "appliance_queue_depth",
        "appliance_busy_slots",
        "appliance_models_loaded",
    ):
        assert required in names(after), f"{required} missing from /metrics"

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("appliance_requests_total", route="/v1/completions", method="POST", status="200") == 2
    assert delta("appliance_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert delta("appliance_requests_total", route="/v1/completions", method="POST", status="404") == 1
    assert delta("appliance_request_errors_total", route="/v1/completions", status="404") == 1
    assert delta("appliance_generation_tokens_total", model=MODEL) == 5 + 5 + 7
    assert delta("appliance_time_to_first_token_seconds_count", model=MODEL) == 3
    assert delta("appliance_time_to_first_token_seconds_sum", model=MODEL) > 0
    assert value(after, "appliance_time_to_first_token_seconds_bucket", model=MODEL, le="+Inf") >= 3
    assert value(after, "appliance_models_loaded") >= 1
    assert (("appliance_queue_depth", (("model", MODEL),)) in after) and value(after, "appliance_queue_depth", model=MODEL) == 0
    assert (("appliance_busy_slots", (("model", MODEL),)) in after) and value(after, "appliance_busy_slots", model=MODEL) == 0
    assert value(after, "appliance_slots", model=MODEL) == 4
    # One observation per finished request (the streamed chat included) in each request histogram;
    # all three requests made two tokens or more, so each has an inter-token gap.
    for hist in ("appliance_request_queue_time_seconds", "appliance_e2e_request_latency_seconds",
                 "appliance_inter_token_latency_seconds"):
        assert delta(f"{hist}_count", model=MODEL) == 3, hist
        assert value(after, f"{hist}_bucket", model=MODEL, le="+Inf") >= 3, hist
    assert delta("appliance_e2e_request_latency_seconds_sum", model=MODEL) >= delta(
        "appliance_time_to_first_token_seconds_sum", model=MODEL)
    prompt_total = delta("appliance_prompt_tokens_total", model=MODEL)
    assert prompt_total >= 3 and prompt_total == delta("appliance_prompt_tokens_processed_total", model=MODEL) + delta(
        "appliance_prompt_tokens_cached_total", model=MODEL)
    text = server.get("/metrics").text
    # Prometheus conventions: counters end in _total, no _created series beside them.
    assert "_created" not in text
    for family in text_string_to_metric_families(text):
        if family.type == "counter":
            assert {s.name for s in family.samples} <= {family.name + "_total"}, family.name
    # Labels never carry request data: no prompt text anywhere in the exposition.
    assert "Count" not in text


def test_attestation_requests_are_counted(server):
    before = scrape(server)
    bad = server.get("/v1/attestation", params={"nonce": "not-hex"})
    assert bad.status_code == 400
    server.get("/v1/attestation", params={"nonce": "ab" * 32})
    after = scrape(server)
    counted = {dict(labels)["status"]: v - before.get((name, labels), 0.0)
               for (name, labels), v in after.items() if name == "appliance_attestation_requests_total"}
    assert counted.get("400") == 1, counted
    assert sum(counted.values()) == 2, counted


def test_metrics_gauges_under_load(server):
    """While more requests than slots run, the gauges show busy slots and a queue."""
    import threading
    import time

    stop = threading.Event()
    seen = {"busy": 0, "queue": 0}

    def poll():
        while not stop.is_set():
            s = scrape(server)
            seen["busy"] = max(seen["busy"], value(s, "appliance_busy_slots", model=MODEL))
            seen["queue"] = max(seen["queue"], value(s, "appliance_queue_depth", model=MODEL))
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    results = []

    def work(i):
        r = server.post("/v1/completions", json={"model": MODEL, "prompt": f"Go {i}", "max_tokens": 300,
                                                  "ignore_eos": True, "seed": i})
        results.append(r.status_code)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    poller.join(10)
    assert results == [200] * 6
    assert seen["busy"] == 4, seen  # every slot in use at some point
    assert seen["queue"] >= 1, seen  # and the two extra requests waited
    final = scrape(server)
    assert value(final, "appliance_busy_slots", model=MODEL) == 0
    assert value(final, "appliance_queue_depth", model=MODEL) == 0
