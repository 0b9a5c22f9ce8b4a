"""The telemetry policy (spec/telemetry.md): its committed form, its coverage of the code, and its filters."""

from __future__ import annotations

import ast
import json
import logging
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.logs import JsonFormatter
from appliance.metrics import Metrics
from appliance.telemetry import (
    POLICY,
    LogPolicy,
    MetricsPolicy,
    filter_status,
    normal_method,
    policy_bytes,
    policy_sha256,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "spec" / "telemetry.md"


def test_the_committed_json_is_the_policy_the_code_enforces():
    committed = (ROOT / "spec" / "telemetry-policy.json").read_bytes()
    assert committed.rstrip(b"\n") == policy_bytes(), "regenerate: python -m appliance.telemetry > spec/telemetry-policy.json"
    assert json.loads(committed) == POLICY
    assert re.fullmatch(r"[0-9a-f]{64}", policy_sha256())


def test_the_document_lists_every_family_with_its_labels():
    text = SPEC.read_text()
    rows = dict(re.findall(r"^\| `(appliance_[a-z0-9_]+)` \| \w+ \| ([^|]+) \|$", text, re.M))
    assert set(rows) == set(POLICY["metrics"]), "spec/telemetry.md §3 and the policy list different families"
    for name, rule in POLICY["metrics"].items():
        listed = [] if rows[name].strip() == "(none)" else [x.strip() for x in rows[name].split(",")]
        assert listed == rule["labels"], name
    for label in POLICY["labels"]:
        if label != "le":
            assert f"| `{label}` |" in text, f"label {label} has no rule in spec/telemetry.md"
    for field in POLICY["logs"]["fields"]:
        assert f"`{field}`" in text, f"log field {field} missing from spec/telemetry.md §5"


def test_every_family_the_code_registers_is_in_the_policy_and_no_other():
    m = Metrics()
    registered = {f.name: f.type for f in m.registry.collect()}
    # the scrape-time collectors (models, worker restarts) register on watch_*; their names are fixed
    registered |= {"appliance_queue_depth": "gauge", "appliance_busy_slots": "gauge", "appliance_slots": "gauge",
                   "appliance_models_loaded": "gauge", "appliance_worker_restarts": "counter",
                   "appliance_worker_restarts_by_cause": "counter"}
    assert registered == {k: v["type"] for k, v in POLICY["metrics"].items()}


def _exposition(build) -> dict[str, list]:
    r = CollectorRegistry()
    build(r)
    policy = MetricsPolicy(["/v1/completions"])

    class Filtered:
        def collect(self):
            return policy.filter_families(r.collect())

    text = generate_latest(Filtered()).decode()  # type: ignore[arg-type]
    return {f.name: [(s.name, s.labels) for s in f.samples] for f in text_string_to_metric_families(text)}


def test_metrics_filter_keeps_what_the_rules_allow_and_drops_the_rest():
    def build(r):
        c = Counter("appliance_requests_total", "", ["route", "method", "status"], registry=r)
        c.labels("/v1/completions", "POST", "200").inc()
        c.labels("/v1/completions?prompt=secret", "POST", "200").inc()  # not a route template
        c.labels("/v1/completions", "BREW", "200").inc()  # not a normalised method
        c.labels("/v1/completions", "POST", "2000").inc()
        Counter("appliance_prompt_text_total", "", ["prompt"], registry=r).labels("hello").inc()  # not a family
        g = Gauge("appliance_queue_depth", "", ["model", "user"], registry=r)  # extra label name
        g.labels("m", "alice").set(1)
        Gauge("appliance_busy_slots", "", ["model"], registry=r).labels("bad model name!").set(1)

    out = _exposition(build)
    assert out["appliance_requests"] == [
        ("appliance_requests_total", {"route": "/v1/completions", "method": "POST", "status": "200"})]
    assert "appliance_prompt_text" not in out
    assert out.get("appliance_queue_depth", []) == [] and out.get("appliance_busy_slots", []) == []


def test_routes_the_app_serves_pass_and_unmatched_passes():
    policy = MetricsPolicy(["/v1/models"])

    class Fam:
        name, type = "appliance_request_errors", "counter"

        def __init__(self, route):
            self.samples = [type("S", (), {"labels": {"route": route, "status": "404"}})()]

    assert [len(f.samples) for f in policy.filter_families([Fam("/v1/models"), Fam("unmatched"), Fam("/v1/x")])] == [1, 1, 0]
    assert policy.dropped == 1


def test_methods_are_normalised():
    assert normal_method("GET") == "GET" and normal_method("BREW") == "OTHER" and normal_method("get") == "OTHER"


def test_status_keeps_listed_keys_only():
    status = {
        "version": "1", "uptime_seconds": 3.5, "secret": "x",
        "models": [{"name": "m", "state": "ready", "last_prompt": "hello", "chat_template": {"source": "gguf", "text": "t"}}],
        "devices": [{"name": "CPU", "probes": [{"ok": True, "stdout": "..."}]}],
        "attestation": {"provider": "none", "nonce": "n"},
    }
    assert filter_status(status) == {
        "version": "1", "uptime_seconds": 3.5,
        "models": [{"name": "m", "state": "ready", "chat_template": {"source": "gguf"}}],
        "devices": [{"name": "CPU", "probes": [{"ok": True}]}],
        "attestation": {"provider": "none"},
    }
    # a nested value where the policy expects a scalar is not shown
    assert filter_status({"version": {"prompt": "x"}}) == {"version": None}


def _record(msg, args=(), **extra) -> logging.LogRecord:
    rec = logging.LogRecord("appliance.test", logging.INFO, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_log_lines_hold_listed_fields_only_each_checked():
    line = json.loads(JsonFormatter().format(_record("request", request_id="abc-1", method="POST", route="/v1/completions",
                                                     status=200, ms=1.5, prompt="hello", user="bob")))
    assert line["request_id"] == "abc-1" and line["route"] == "/v1/completions" and line["status"] == 200
    assert "prompt" not in line and "user" not in line and line["withheld"] == ["prompt", "user"]
    bad = json.loads(JsonFormatter().format(_record("request", request_id="has spaces and a prompt", status="200")))
    assert "request_id" not in bad and "status" not in bad and bad["withheld"] == ["request_id", "status"]


def test_string_arguments_are_cut_and_bytes_never_shown():
    long = "p" * 5000
    line = json.loads(JsonFormatter().format(_record("model %s failed: %s", ("m", long))))
    assert len(line["msg"]) < 300 and "4800 more characters" in line["msg"]
    line = json.loads(JsonFormatter().format(_record("got %s", (b"secret bytes",))))
    assert line["msg"] == "got <12 bytes>"
    line = json.loads(JsonFormatter().format(_record("%(a)s", ({"a": "q" * 1000},))))
    assert len(line["msg"]) < 300
    assert LogPolicy().cut(7) == 7


_LOG_METHODS = {"debug", "info", "warning", "error", "exception", "critical", "log"}


def _logging_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _LOG_METHODS
                and isinstance(node.func.value, (ast.Name, ast.Attribute))):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else node.func.value.attr
            if "log" in owner.lower():
                yield node


def test_every_logging_call_uses_a_literal_template():
    """No f-string, concatenation or variable as a message: every message a log holds is in the source."""
    offenders, seen = [], 0
    for path in sorted((ROOT / "appliance").rglob("*.py")):
        for call in _logging_calls(ast.parse(path.read_text(), str(path))):
            seen += 1
            args = call.args[1:] if call.func.attr == "log" else call.args
            if not args or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)):
                offenders.append(f"{path.relative_to(ROOT)}:{call.lineno}")
    assert seen > 20, "the scan found too few logging calls to be looking in the right place"
    assert not offenders, f"logging calls without a literal template: {offenders}"


@pytest.mark.parametrize("field,value,ok", [
    ("logger", "appliance.http", True), ("logger", "gunicorn.error", True), ("logger", "evil", False),
    ("route", "/v1/chat/completions", True), ("route", "unmatched", True), ("route", "/v1/x?q=1", False),
    ("method", "OTHER", True), ("method", "brew", False), ("pid", 12, True), ("pid", "12", False),
])
def test_field_rules(field, value, ok):
    assert (field in LogPolicy().apply({field: value})) is ok
