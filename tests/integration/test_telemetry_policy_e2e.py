"""The telemetry policy (spec/telemetry.md) against a real server: canaries sent everywhere a client can
put them, then every output an operator sees (/metrics, /status, every log line) checked against the
policy and for the canaries."""

from __future__ import annotations

import hashlib
import json
import secrets

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from appliance.telemetry import POLICY, LogPolicy, MetricsPolicy
from appliance.web.app import ROUTES

pytestmark = pytest.mark.integration

CANARY = "cnry" + secrets.token_hex(8)
REQUEST_ID = "rid-" + secrets.token_hex(8)  # the one client-chosen value the access log may hold
API_KEY = "sk-tel-" + secrets.token_urlsafe(24)
ADMIN_KEY = "sk-tel-admin-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def telemetry_server(start_server, model_files):
    config = f"""
[server]
log_level = "debug"

[[auth.api_keys]]
name = "tel"
sha256 = "{hashlib.sha256(API_KEY.encode()).hexdigest()}"
scopes = ["inference"]

[[auth.api_keys]]
name = "tel-admin"
sha256 = "{hashlib.sha256(ADMIN_KEY.encode()).hexdigest()}"
scopes = ["admin"]
"""
    server = start_server(models={"m": model_files.main}, config=config, name="telemetry")
    yield server
    server.stop()


def _abuse(server) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    url = server.url
    sent = []

    def send(method, path, **kw):
        r = requests.request(method, url + path, timeout=60, **kw)
        sent.append((method, path, r.status_code))
        return r

    r = send("POST", "/v1/completions", headers={**auth, "X-Request-Id": REQUEST_ID, "User-Agent": CANARY,
                                                  "X-Canary": CANARY},
             json={"model": "m", "prompt": f"Say {CANARY} {CANARY}", "max_tokens": 4, "seed": 1})
    assert r.status_code == 200, r.text
    r = send("POST", "/v1/chat/completions", headers=auth, stream=True,
             json={"model": "m", "messages": [{"role": "user", "content": CANARY}], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.content
    assert send("POST", "/v1/completions", headers={"Authorization": f"Bearer sk-{CANARY}"},
                json={"model": "m", "prompt": "x"}).status_code == 401
    assert send("POST", "/v1/completions", headers=auth, json={"model": CANARY, "prompt": "x"}).status_code == 404
    assert send("GET", f"/v1/{CANARY}?{CANARY}=1", headers=auth).status_code == 404
    assert send("GET", f"/v1/models?q={CANARY}", headers={**auth, "Cookie": f"s={CANARY}"}).status_code == 200
    assert send("BREW", "/v1/models", headers=auth).status_code in (400, 405)
    assert send("POST", "/v1/completions", headers={**auth, "Content-Type": "application/json"},
                data=f'{{"model": "m", "prompt": "{CANARY}"'.encode()).status_code == 400
    assert send("POST", "/v1/completions", headers=auth,
                json={"model": "m", "prompt": CANARY, "max_tokens": CANARY, "stop": [CANARY]}).status_code == 400
    assert send("POST", "/tokenize", headers=auth, json={"model": "m", "content": CANARY}).status_code == 200
    assert send("POST", "/load_model", headers=admin, json={"model": f"bad name {CANARY}",
                                                            "path": f"/nowhere/{CANARY}.gguf"}).status_code in (400, 404)
    send("GET", "/v1/attestation", params={"nonce": CANARY})
    assert len(sent) == 12


def test_every_output_holds_to_the_policy_and_no_canary_reaches_it(telemetry_server):
    server = telemetry_server
    _abuse(server)

    # /metrics: every family and sample allowed by the policy, no canary
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
    assert metrics.status_code == 200, metrics.text
    text = metrics.text
    assert CANARY not in text and REQUEST_ID not in text
    families = list(text_string_to_metric_families(text))
    n_samples = sum(len(f.samples) for f in families)
    policy = MetricsPolicy(path for path, _, _ in ROUTES)
    kept = sum(len(f.samples) for f in policy.filter_families(families))
    assert policy.dropped == 0 and kept == n_samples > 50
    names = {f.name for f in families}
    assert {"appliance_requests", "appliance_auth_failures", "appliance_attestation_requests",
            "appliance_e2e_request_latency_seconds"} <= names
    assert 'method="OTHER"' in text and 'route="unmatched"' in text

    # /status: only the keys the policy lists, no canary
    status = requests.get(server.url + "/status", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert status.status_code == 200, status.text
    assert CANARY not in status.text and REQUEST_ID not in status.text
    body = status.json()
    assert set(body) <= set(POLICY["status"])
    for model in body["models"]:
        assert set(model) <= set(POLICY["status"]["models"][0])

    # every log line: JSON, only listed fields, each valid; nothing of ours withheld (our code keeps
    # to the rules by itself); the canary nowhere; the client's request id only in request_id
    lines = [ln for ln in server.stderr().splitlines() if ln.strip()]
    assert len(lines) > 12
    allowed = set(POLICY["logs"]["fields"])
    check = LogPolicy()
    seen_request_id = 0
    for ln in lines:
        assert CANARY not in ln, ln
        rec = json.loads(ln)  # every line, gunicorn's own included
        if rec["logger"].startswith("gunicorn"):
            rec.pop("withheld", None)  # gunicorn's statsd fields (metric, mtype, value) are left out
        assert set(rec) <= allowed, ln
        assert check.apply(rec) == rec, ln
        if REQUEST_ID in ln:
            assert rec.get("request_id") == REQUEST_ID and REQUEST_ID not in json.dumps({k: v for k, v in rec.items()
                                                                                         if k != "request_id"})
            seen_request_id += 1
    assert seen_request_id == 1
    access = [json.loads(ln) for ln in lines if '"msg": "request"' in ln]
    assert {a["route"] for a in access} >= {"/v1/completions", "unmatched", "/v1/models"}
