"""The telemetry policy (spec/telemetry.md): what `/metrics`, `/status` and the logs may ever contain.

The policy is data (`POLICY`); its canonical JSON (`policy_bytes()`, committed as
spec/telemetry-policy.json) is hashed into the attestation claims (`telemetry_policy_sha256`), so a
verifier knows which rules the attested binary applies. The binary enforces it at the three outputs:

- metrics: `MetricsPolicy.filter_families` drops any family the policy does not list, any sample whose label names
  differ from the family's, and any sample with a label value outside its rule;
- `/status`: `filter_status` keeps only the keys the policy lists (recursively);
- logs: `LogPolicy` keeps only the listed fields, checks each against its rule, and cuts every string
  argument interpolated into a message (the templates themselves are literals in the source: a test
  checks every logging call).

Nothing here reads a request: the rules bound what code that does read requests can emit.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

__all__ = [
    "POLICY", "policy_bytes", "policy_sha256", "MetricsPolicy", "filter_status", "LogPolicy", "METHODS",
    "normal_method",
]

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE", "OTHER")

_MODEL = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"  # settings.ModelSettings.name, set by the operator or an admin key
_STATUS = r"^[1-5][0-9]{2}$"

# A label or field rule: {"enum": [...]}, {"pattern": "..."}, {"source": "routes"} (the server's own
# route templates, fixed in the binary, or "unmatched"), or {"type": "number"|"integer"|"boolean"}.
POLICY: dict[str, Any] = {
    "version": 1,
    "principles": [
        "no prompt, completion, embedding input, tool argument or conversation text",
        "no API key, signature, nonce or other secret, and no digest of a secret",
        "no value a client chooses, except the X-Request-Id it sends (pattern-limited) in the access log",
        "label values come from the binary (routes, reasons, causes), the operator (model names) or fixed sets",
    ],
    "labels": {
        "route": {"source": "routes"},
        "method": {"enum": list(METHODS)},
        "status": {"pattern": _STATUS},
        "model": {"pattern": _MODEL},
        "reason": {"enum": ["bad_signature", "invalid_key", "malformed", "missing", "no_admin_key", "replay",
                            "replay_cache_full", "scope", "unsigned"]},
        "writer": {"enum": ["event_loop", "scheduler"]},
        "cause": {"pattern": r"^(SIG[A-Z0-9]{1,12}|exit_[0-9]{1,3}|timeout)$"},
        "provider": {"enum": ["none", "simulated", "tdx", "sev-snp", "nitro", "gramine-sgx"]},
        "le": {"pattern": r"^([0-9.e+-]+|\+Inf)$"},
    },
    "metrics": {
        "appliance_requests": {"type": "counter", "labels": ["method", "route", "status"]},
        "appliance_request_errors": {"type": "counter", "labels": ["route", "status"]},
        "appliance_request_duration_seconds": {"type": "histogram", "labels": ["route"]},
        "appliance_time_to_first_token_seconds": {"type": "histogram", "labels": ["model"]},
        "appliance_inter_token_latency_seconds": {"type": "histogram", "labels": ["model"]},
        "appliance_request_queue_time_seconds": {"type": "histogram", "labels": ["model"]},
        "appliance_e2e_request_latency_seconds": {"type": "histogram", "labels": ["model"]},
        "appliance_generation_tokens": {"type": "counter", "labels": ["model"]},
        "appliance_prompt_tokens": {"type": "counter", "labels": ["model"]},
        "appliance_prompt_tokens_cached": {"type": "counter", "labels": ["model"]},
        "appliance_prompt_tokens_processed": {"type": "counter", "labels": ["model"]},
        "appliance_embedding_tokens": {"type": "counter", "labels": ["model"]},
        "appliance_streams": {"type": "counter", "labels": ["writer"]},
        "appliance_auth_failures": {"type": "counter", "labels": ["reason"]},
        "appliance_attestation_requests": {"type": "counter", "labels": ["provider", "status"]},
        "appliance_queue_depth": {"type": "gauge", "labels": ["model"]},
        "appliance_busy_slots": {"type": "gauge", "labels": ["model"]},
        "appliance_slots": {"type": "gauge", "labels": ["model"]},
        "appliance_models_loaded": {"type": "gauge", "labels": []},
        "appliance_worker_restarts": {"type": "counter", "labels": []},
        "appliance_worker_restarts_by_cause": {"type": "counter", "labels": ["cause"]},
    },
    # /status: the keys it may hold ({} = any scalar value; a nested object = its own keys; [obj] = a
    # list of such objects). Operator-set values only: model names, paths and digests of the files the
    # operator or an admin key loaded, and the appliance's own state.
    "status": {
        "version": {},
        "uptime_seconds": {},
        "devices": [{
            "name": {}, "type": {}, "description": {}, "module": {}, "extra_buffers": {}, "reason": {},
            "probes": [{"module": {}, "extra_buffers": {}, "ok": {}, "detail": {}, "seconds": {}}],
        }],
        "models": [{
            "name": {}, "path": {}, "sha256": {}, "size": {}, "n_params": {}, "n_ctx": {}, "slots": {},
            "busy_slots": {}, "queue_depth": {}, "state": {}, "loaded_at": {}, "load_seconds": {}, "error": {},
            "mmap": {},
            "chat_template": {"source": {}, "name": {}},
            "embeddings": {"pooling": {}, "dimensions": {}, "max_input_tokens": {}},
            "kv_host_cache": {"entries": {}, "bytes": {}, "budget_bytes": {}, "saved": {}, "restored": {},
                              "evicted": {}},
        }],
        "attestation": {"provider": {}, "evidence": {}, "error": {}, "checked_at": {}},
    },
    # Logs: one JSON object per line with these fields only.
    "logs": {
        "fields": {
            "ts": {"type": "number"},
            "time": {"pattern": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$"},
            "level": {"enum": ["debug", "info", "warning", "error", "critical"]},
            "logger": {"pattern": r"^(appliance|attestation|gunicorn)(\.[a-z_.]+)?$"},
            "msg": {"type": "string"},
            "exc_type": {"pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,80}$"},
            "exc_at": {"type": "string"},
            "request_id": {"pattern": r"^[A-Za-z0-9._-]{1,128}$"},
            "method": {"enum": list(METHODS)},
            "route": {"pattern": r"^(/[A-Za-z0-9_/{}.-]{0,120}|unmatched)$"},  # a route template, from the code
            "status": {"type": "integer"},
            "ms": {"type": "number"},
            "pid": {"type": "integer"},
            "cause": {"pattern": r"^(SIG[A-Z0-9]{1,12}|exit_[0-9]{1,3}|timeout)$"},
            "restarts": {"type": "integer"},
            "seconds_since_death": {"type": "number"},
            "desired_models": {"type": "integer"},
            "requests": {"type": "integer"},
        },
        # A string argument interpolated into a message template is cut to this many characters (a
        # file path or an error from llama.cpp fits; a prompt does not get through whole).
        "max_arg_chars": 200,
    },
}


def policy_bytes() -> bytes:
    """The canonical encoding: UTF-8 JSON, keys sorted, no whitespace (spec/telemetry-policy.json)."""
    return json.dumps(POLICY, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def policy_sha256() -> str:
    return hashlib.sha256(policy_bytes()).hexdigest()


def normal_method(method: str) -> str:
    """A request's method as metrics and logs may show it: a standard one, or OTHER."""
    return method if method in METHODS else "OTHER"


class _Rules:
    def __init__(self, rules: Mapping[str, Mapping[str, Any]], routes: frozenset[str]) -> None:
        self._routes = routes | {"unmatched"}
        self._check: dict[str, Any] = {}
        for name, rule in rules.items():
            if "enum" in rule:
                allowed = frozenset(rule["enum"])
                self._check[name] = lambda v, a=allowed: v in a
            elif "pattern" in rule:
                rx = re.compile(rule["pattern"])
                self._check[name] = lambda v, rx=rx: isinstance(v, str) and rx.fullmatch(v) is not None
            elif rule.get("source") == "routes":
                self._check[name] = lambda v: v in self._routes
            elif rule.get("type") == "number":
                self._check[name] = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
            elif rule.get("type") == "integer":
                self._check[name] = lambda v: isinstance(v, int) and not isinstance(v, bool)
            elif rule.get("type") == "string":
                self._check[name] = lambda v: isinstance(v, str)
            else:
                raise ValueError(f"telemetry policy: rule for {name!r} has no check")

    def ok(self, name: str, value: object) -> bool:
        check = self._check.get(name)
        return check is not None and bool(check(value))


class MetricsPolicy:
    def __init__(self, routes: Iterable[str]) -> None:
        self._labels = _Rules(POLICY["labels"], frozenset(routes))
        self._families: dict[str, dict[str, Any]] = POLICY["metrics"]
        self.dropped = 0

    def filter_families(self, families: Iterable[Any]) -> Iterator[Any]:
        """prometheus_client Metric families, less whatever the policy does not allow."""
        for fam in families:
            rule = self._families.get(fam.name)
            if rule is None or rule["type"] != fam.type:
                self.dropped += len(fam.samples)
                continue
            allowed = set(rule["labels"])
            kept = []
            for s in fam.samples:
                names = set(s.labels) - {"le"}
                if names == allowed and all(self._labels.ok(k, v) for k, v in s.labels.items()):
                    kept.append(s)
                else:
                    self.dropped += 1
            fam.samples = kept
            yield fam


def filter_status(obj: Any, shape: Any = None) -> Any:
    """`/status` as the policy allows it: unknown keys dropped at every level."""
    shape = POLICY["status"] if shape is None else shape
    if isinstance(shape, list):
        return [filter_status(x, shape[0]) for x in obj] if isinstance(obj, list) else None
    if isinstance(shape, dict) and shape:
        if not isinstance(obj, dict):
            return None
        return {k: filter_status(v, shape[k]) for k, v in obj.items() if k in shape}
    # a leaf: scalars only (a nested value where a scalar is expected is not shown)
    return obj if obj is None or isinstance(obj, (str, int, float, bool)) else None


class LogPolicy:
    """Applied by the JSON log formatter to every record it writes."""

    def __init__(self) -> None:
        self._fields = _Rules(POLICY["logs"]["fields"], frozenset())
        self.max_arg_chars: int = POLICY["logs"]["max_arg_chars"]

    def cut(self, arg: object) -> object:
        if isinstance(arg, str) and len(arg) > self.max_arg_chars:
            return arg[: self.max_arg_chars] + f"...[{len(arg) - self.max_arg_chars} more characters]"
        if isinstance(arg, (bytes, bytearray)):
            return f"<{len(arg)} bytes>"
        return arg

    def apply(self, out: dict[str, Any]) -> dict[str, Any]:
        """The fields the policy allows, each checked; others are named in `withheld`, never shown."""
        kept: dict[str, Any] = {}
        withheld: list[str] = []
        for k, v in out.items():
            if self._fields.ok(k, v):
                kept[k] = v
            else:
                withheld.append(k)  # field names come from the code, never from a request
        if withheld:
            kept["withheld"] = sorted(withheld)
        return kept


if __name__ == "__main__":  # python -m appliance.telemetry > spec/telemetry-policy.json
    import sys

    sys.stdout.buffer.write(policy_bytes() + b"\n")
