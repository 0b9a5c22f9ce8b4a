"""The trust layer in process: auth modes, client request signatures, rate limits, replay cache,
security headers, CORS, model confinement and the sha256 allowlist, metrics, the off-loopback refusal.

Every response these tests receive, 401/403/413/429 included, is verified with `attestation.signing`
against the app's identity (and its `created` against the injected clock).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import os

import falcon.testing
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from appliance.trust import auth as auth_module
from appliance.trust.auth import RateLimiter, ReplayCache, ReplayCacheFull
from appliance.web.app import create_app
from attestation import signing
from tests.conftest import FakeRegistry

T0 = 1_700_000_000.0
INFER_KEY = "sk-infer-" + "a" * 32
ADMIN_KEY = "sk-admin-" + "b" * 32
BOTH_KEY = "sk-both-" + "c" * 32
CLIENT = Ed25519PrivateKey.from_private_bytes(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
STRANGER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


METRICS_KEY = "sk-metrics-" + "m" * 24


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def pub_b64(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes_raw()).decode()


KEYS = {
    "api_keys": [
        {"name": "infer", "sha256": sha(INFER_KEY), "scopes": ["inference"]},
        {"name": "admin", "sha256": sha(ADMIN_KEY), "scopes": ["admin"]},
        {"name": "both", "sha256": sha(BOTH_KEY), "scopes": ["inference", "admin"]},
        {"name": "scraper", "sha256": sha(METRICS_KEY), "scopes": ["metrics"]},
    ]
}
CLIENT_KEYS = {"client_keys": [{"keyid": "client-1", "public_key": pub_b64(CLIENT), "scopes": ["inference"]}]}


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class Api:
    """falcon.testing with exact request bytes; every response's signature verified on arrival."""

    def __init__(self, config: dict | None = None, *, registry=None, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.settings = Settings.model_validate(config or {})
        if registry is None:
            registry = FakeRegistry()
            registry.add("tiny")
        self.registry = registry
        self.app, self.state = create_app(self.settings, models=registry, wall_clock=self.clock)
        self.client = falcon.testing.TestClient(self.app)
        self.public_key = signing.public_key_from_b64(base64.b64encode(self.state.identity.public_raw).decode())
        self.verified: list = []

    def request(self, method: str, path: str, *, json_body=None, body: bytes | None = None, headers=None,
                query: str = "", remote_addr: str = "127.0.0.1", verify: bool = True):
        headers = dict(headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode()
            headers.setdefault("Content-Type", "application/json")
        result = self.client.simulate_request(
            method, path, body=body, headers=headers, query_string=query or None, remote_addr=remote_addr
        )
        if verify:
            self.verified.append(self.verify(method, path + (f"?{query}" if query else ""), body or b"", headers, result))
        return result

    def verify(self, method, target, body, headers, result, *, nonce=...):
        if nonce is ...:
            nonce = next((v for k, v in headers.items() if k.lower() == signing.NONCE_HEADER), None)
        digest = next((v for k, v in headers.items() if k.lower() == "content-digest"), None)
        info = signing.RequestInfo(method, target, body, nonce, digest)
        common = dict(request=info, status=result.status_code, headers=dict(result.headers),
                      max_age=datetime.timedelta(seconds=60), now=self.clock())
        if "event-stream" in result.headers.get("content-type", ""):
            return signing.verify_stream(self.public_key, transcript=result.content, **common)
        return signing.verify_response(self.public_key, body=result.content, **common)

    def post(self, path, json_body=None, **kw):
        return self.request("POST", path, json_body=json_body, **kw)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def complete(self, **kw):
        return self.post("/v1/completions", COMPLETION, **kw)

    def auth_failures(self) -> dict[str, float]:
        text = self.state.metrics.render().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("appliance_auth_failures_total{"):
                reason = line.split('reason="', 1)[1].split('"', 1)[0]
                out[reason] = float(line.rsplit(" ", 1)[1])
        return out


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(result, status: int, type_: str):
    assert result.status_code == status, result.text
    assert result.headers["content-type"].startswith("application/json")
    body = result.json
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Auth modes


def test_open_loopback_serves_inference_and_admin(tmp_path):
    api = Api()
    assert api.complete().status_code == 200
    assert api.get("/metrics").status_code == 200
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + b"\0" * 60)
    r = api.post("/load_model", {"model_name": "m2", "model_path": str(model)})
    assert r.status_code == 200, r.text
    assert "appliance-client" not in r.headers  # nobody authenticated


def test_open_inference_off_loopback_closes_admin():
    api = Api({"server": {"host": "0.0.0.0"}, "auth": {"open_inference": True}})
    assert api.complete(remote_addr="203.0.113.7").status_code == 200
    assert api.post("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "x"}]},
                    remote_addr="203.0.113.7").status_code == 200
    err = assert_refused(api.get("/metrics", remote_addr="203.0.113.7"), 403, "permission_error")
    assert "admin" in err["message"]
    assert_refused(api.post("/load_model", {"model_name": "x", "model_path": "/m/x.gguf"}), 403, "permission_error")
    assert_refused(api.post("/unload_model", {"model_name": "tiny"}), 403, "permission_error")
    assert api.auth_failures() == {"no_admin_key": 3.0}


@pytest.mark.parametrize("headers", [
    {},
    bearer("sk-wrong"),
    bearer(""),
    {"Authorization": "Basic " + base64.b64encode(b"u:" + INFER_KEY.encode()).decode()},
    {"Authorization": INFER_KEY},
    bearer(INFER_KEY + "x"),
    bearer(sha(INFER_KEY)),  # the stored digest is not a key
])
def test_keys_configured_missing_or_wrong_key_is_401_with_one_message(headers):
    api = Api({"auth": KEYS})
    r = api.complete(headers=headers)
    err = assert_refused(r, 401, "authentication_error")
    assert err == {"message": "Invalid or missing credentials", "type": "authentication_error", "param": None,
                   "code": "invalid_api_key"}
    assert INFER_KEY not in r.text and "sk-" not in r.text
    assert sum(api.auth_failures().values()) == 1


def test_keys_configured_right_key_scopes_and_public_routes():
    api = Api({"auth": KEYS})
    r = api.complete(headers=bearer(INFER_KEY))
    assert r.status_code == 200
    assert r.headers["appliance-client"] == "infer"
    assert '"appliance-client"' in r.headers["signature-input"]
    assert api.verified[-1].covered['"appliance-client"'] == "infer"
    assert api.complete(headers=bearer(BOTH_KEY)).headers["appliance-client"] == "both"
    # an inference key on an admin route; an admin-only key on inference
    assert_refused(api.get("/metrics", headers=bearer(INFER_KEY)), 403, "permission_error")
    assert_refused(api.complete(headers=bearer(ADMIN_KEY)), 403, "permission_error")
    assert api.get("/metrics", headers=bearer(ADMIN_KEY)).status_code == 200
    assert api.get("/metrics", headers=bearer(BOTH_KEY)).status_code == 200
    # a scraper's key reads /metrics and nothing else
    assert api.get("/metrics", headers=bearer(METRICS_KEY)).status_code == 200
    assert_refused(api.complete(headers=bearer(METRICS_KEY)), 403, "permission_error")
    assert_refused(api.get("/v1/models", headers=bearer(METRICS_KEY)), 403, "permission_error")
    # bearer scheme is case-insensitive
    assert api.complete(headers={"Authorization": f"bearer {INFER_KEY}"}).status_code == 200
    # public routes need nothing
    for path in ("/health", "/v1/keys"):
        r = api.get(path)
        assert r.status_code == 200, path
        assert "appliance-client" not in r.headers
    # every other route does
    for path in ("/v1/models", "/models", "/status"):
        assert_refused(api.get(path), 401, "authentication_error")
    assert api.auth_failures() == {"scope": 4.0, "missing": 3.0}


def test_bearer_is_compared_against_every_key(monkeypatch):
    calls = []
    real = auth_module.hmac.compare_digest
    import types

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth_module, "hmac", types.SimpleNamespace(compare_digest=counting))
    api = Api({"auth": KEYS})
    for key, status in ((INFER_KEY, 200), (BOTH_KEY, 200), ("sk-nope", 401)):
        calls.clear()
        assert api.complete(headers=bearer(key)).status_code == status
        assert len(calls) == len(KEYS["api_keys"]), key  # no early exit on a match
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the key itself


def test_key_material_is_not_in_settings_or_responses():
    api = Api({"auth": KEYS})
    dumped = json.dumps(api.settings.model_dump(mode="json"))
    assert INFER_KEY not in dumped and ADMIN_KEY not in dumped
    r = api.get("/v1/keys")
    keys = r.json
    assert keys["kid"] == signing.key_id(api.state.identity.public_raw)
    assert base64.b64decode(keys["public_key"]) == api.state.identity.public_raw
    assert "Identity(kid=" in repr(api.state.identity) and "private" not in repr(api.state.identity).lower()


# ---------------------------------------------------------------------------------------------
# Client request signatures


def signed_headers(key=CLIENT, keyid="client-1", *, method="POST", target="/v1/completions", body: bytes,
                   created: float, expires: float, nonce: str) -> dict:
    return {
        "Content-Type": "application/json",
        **signing.sign_request(
            key, keyid, method=method, target=target, body=body,
            created=datetime.datetime.fromtimestamp(int(created), tz=datetime.UTC),
            expires=datetime.datetime.fromtimestamp(int(expires), tz=datetime.UTC), nonce=nonce,
        ),
    }


BODY = json.dumps(COMPLETION).encode()


def test_signed_request_is_accepted_and_the_client_bound():
    api = Api({"auth": {**KEYS, **CLIENT_KEYS}})
    t = api.clock()
    h = signed_headers(body=BODY, created=t, expires=t + 60, nonce="n-1")
    r = api.request("POST", "/v1/completions", body=BODY, headers=h)
    assert r.status_code == 200, r.text
    assert r.headers["appliance-client"] == "client-1"
    assert api.verified[-1].covered['"appliance-client"'] == "client-1"
    # the same response does not verify without the client binding or for another request
    with pytest.raises(signing.VerificationError):
        api.verify("POST", "/v1/completions", BODY + b" ", h, r)
    # a GET with a query string, signed over @path and @query
    h = signed_headers(method="GET", target="/v1/models?limit=1", body=b"", created=t, expires=t + 60, nonce="n-2")
    assert api.request("GET", "/v1/models", query="limit=1", headers=h).status_code == 200


@pytest.mark.parametrize("case", ["expired", "not_yet_valid", "window_too_long", "body_and_digest_changed",
                                  "path_changed", "unknown_keyid", "wrong_key", "no_nonce_param", "garbage"])
def test_bad_client_signatures_are_401(case):
    api = Api({"auth": {**CLIENT_KEYS, "signature_window": 300}})
    t = api.clock()
    body, target, keyid, key = BODY, "/v1/completions", "client-1", CLIENT
    created, expires = t, t + 60
    if case == "expired":
        created, expires = t - 120, t - 60
    elif case == "not_yet_valid":
        created, expires = t + 400, t + 450
    elif case == "window_too_long":
        expires = t + 3600
    elif case == "unknown_keyid":
        keyid, key = "client-2", STRANGER
    elif case == "wrong_key":
        key = STRANGER
    h = signed_headers(key, keyid, target=target, body=body, created=created, expires=expires, nonce=f"n-{case}")
    if case == "body_and_digest_changed":
        body = body.replace(b"hi", b"ho")
        h["Content-Digest"] = signing.content_digest(body)
    elif case == "path_changed":
        target = "/completions"
    elif case == "no_nonce_param":
        h["Signature-Input"] = h["Signature-Input"].replace(';nonce="n-no_nonce_param"', "")
    elif case == "garbage":
        h["Signature"] = "client=:AAAA:"
    r = api.request("POST", target, body=body, headers=h)
    err = assert_refused(r, 401, "authentication_error")
    assert err["message"] == "Invalid or missing credentials"
    assert api.auth_failures() == {"bad_signature": 1.0}


def test_signed_request_whose_body_no_longer_matches_its_content_digest_is_a_400():
    """A Content-Digest is checked when the body is read, before authentication (spec/signing.md §2.3):
    a body changed under a signed request is refused with the 400 every mismatch gets, bound to the
    body received."""
    api = Api({"auth": CLIENT_KEYS})
    t = api.clock()
    h = signed_headers(body=BODY, created=t, expires=t + 60, nonce="n-body")
    changed = BODY.replace(b"hi", b"ho")
    r = api.request("POST", "/v1/completions", body=changed, headers=h)
    err = assert_refused(r, 400, "invalid_request_error")
    assert "Content-Digest" in err["message"]
    assert r.headers["appliance-request-digest"] == signing.content_digest(changed)
    assert api.auth_failures() == {}
    with pytest.raises(signing.VerificationError, match="appliance-request-digest"):
        api.verify("POST", "/v1/completions", BODY, h, r)  # the client that sent BODY: not its answer


def test_replayed_signed_request_is_401_until_it_expires():
    clock = Clock()
    api = Api({"auth": CLIENT_KEYS}, clock=clock)
    h = signed_headers(body=BODY, created=clock(), expires=clock() + 30, nonce="once")
    assert api.request("POST", "/v1/completions", body=BODY, headers=h).status_code == 200
    assert_refused(api.request("POST", "/v1/completions", body=BODY, headers=h), 401, "authentication_error")
    clock.advance(10)
    assert_refused(api.request("POST", "/v1/completions", body=BODY, headers=h), 401, "authentication_error")
    assert api.auth_failures() == {"replay": 2.0}
    # after it expires the replay cache may forget it: the window check refuses it instead
    clock.advance(30)
    assert_refused(api.request("POST", "/v1/completions", body=BODY, headers=h), 401, "authentication_error")
    assert api.auth_failures() == {"replay": 2.0, "bad_signature": 1.0}
    # the same nonce under a fresh signature from another time is still a replay while remembered
    h2 = signed_headers(body=BODY, created=clock(), expires=clock() + 30, nonce="twice")
    assert api.request("POST", "/v1/completions", body=BODY, headers=h2).status_code == 200
    h3 = signed_headers(body=BODY, created=clock() + 1, expires=clock() + 31, nonce="twice")
    assert_refused(api.request("POST", "/v1/completions", body=BODY, headers=h3), 401, "authentication_error")


def test_require_signed_requests_refuses_unsigned():
    api = Api({"auth": {**KEYS, **CLIENT_KEYS, "require_signed_requests": True}})
    assert_refused(api.complete(), 401, "authentication_error")
    assert_refused(api.complete(headers=bearer(INFER_KEY)), 401, "authentication_error")  # a valid key is not enough
    t = api.clock()
    h = signed_headers(body=BODY, created=t, expires=t + 60, nonce="signed")
    assert api.request("POST", "/v1/completions", body=BODY, headers=h).status_code == 200
    assert api.get("/health").status_code == 200  # public routes stay public
    assert api.auth_failures() == {"unsigned": 2.0}


def test_replay_cache_evicts_expired_entries_and_stays_bounded():
    clock = Clock()
    cache = ReplayCache(100, clock)
    for i in range(5):
        assert cache.check_and_add("k", f"n{i}", clock() + 10 * (i + 1))
    assert not cache.check_and_add("k", "n0", clock() + 10)
    assert cache.check_and_add("other-key", "n0", clock() + 10)  # nonces are per key id
    clock.advance(25)  # n0 (t+10) and n1 (t+20) expired
    assert cache.check_and_add("k", "fresh", clock() + 10)
    assert ("k", "n0") not in cache._seen and ("k", "n1") not in cache._seen
    assert ("k", "n2") in cache._seen
    clock.advance(1000)
    assert cache.check_and_add("k", "later", clock() + 10)
    assert list(cache._seen) == [("k", "later")]
    # Full of still-valid nonces: refuse (fail closed) instead of forgetting one that could be replayed.
    small = ReplayCache(3, clock)
    for i in range(3):
        assert small.check_and_add("k", f"m{i}", clock() + 100 + i)
    with pytest.raises(ReplayCacheFull):
        small.check_and_add("k", "m3", clock() + 100)
    assert not small.check_and_add("k", "m0", clock() + 100)  # still remembered: a replay
    clock.advance(100.5)  # m0 expired, m1 and m2 not yet
    assert small.check_and_add("k", "m3", clock() + 100)
    assert len(small._seen) == 3


# ---------------------------------------------------------------------------------------------
# Rate limits


def test_rate_limit_per_key_with_retry_after_and_recovery():
    clock = Clock()
    api = Api({"auth": KEYS, "limits": {"rate_per_minute_per_key": 60, "rate_burst": 2}}, clock=clock)
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 200
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 200
    r = api.complete(headers=bearer(INFER_KEY))
    assert_refused(r, 429, "rate_limit_error")
    assert r.headers["Retry-After"] == "1"
    # another key has its own bucket
    assert api.complete(headers=bearer(BOTH_KEY)).status_code == 200
    clock.advance(1.0)
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 200
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 429
    clock.advance(60)
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 200
    assert api.complete(headers=bearer(INFER_KEY)).status_code == 200


def test_rate_limit_per_address_with_retry_after_and_recovery():
    clock = Clock()
    api = Api({"limits": {"rate_per_minute_per_ip": 6, "rate_burst": 1}}, clock=clock)
    assert api.complete(remote_addr="10.0.0.1").status_code == 200
    r = api.complete(remote_addr="10.0.0.1")
    assert_refused(r, 429, "rate_limit_error")
    assert r.headers["Retry-After"] == "10"
    assert api.complete(remote_addr="10.0.0.2").status_code == 200  # another address
    assert api.get("/health", remote_addr="10.0.0.1").status_code == 200  # public routes are not limited
    clock.advance(4)
    r = api.complete(remote_addr="10.0.0.1")
    assert r.status_code == 429 and r.headers["Retry-After"] == "6"
    clock.advance(6)
    assert api.complete(remote_addr="10.0.0.1").status_code == 200


def test_rate_limit_applies_before_credentials_are_checked():
    """Guessing keys from one address is limited too (the per-address bucket is taken first)."""
    clock = Clock()
    api = Api({"auth": KEYS, "limits": {"rate_per_minute_per_ip": 60, "rate_burst": 2}}, clock=clock)
    assert api.complete(headers=bearer("guess-1")).status_code == 401
    assert api.complete(headers=bearer("guess-2")).status_code == 401
    assert api.complete(headers=bearer("guess-3")).status_code == 429


def test_rate_limiter_is_bounded():
    clock = Clock()
    lim = RateLimiter(60, 1, clock, max_keys=10)
    for i in range(50):
        assert lim.take(f"ip:{i}") is None
    assert len(lim._buckets) == 10
    assert RateLimiter(0, 1, clock).take("x") is None  # 0 = unlimited


def test_a_clock_stepped_back_does_not_drain_the_rate_limits():
    # A wall clock stepped back an hour (NTP, a restored VM) once made (now - last) * rate hugely
    # negative: every key seen before was refused for the hour. Time running backwards adds nothing.
    clock = Clock()
    lim = RateLimiter(60, 2, clock)
    assert lim.take("ip:a") is None and lim.take("ip:a") is None
    assert lim.take("ip:a") is not None  # the burst is spent
    clock.advance(-3600)
    assert lim.take("ip:a") is not None  # still spent, but not an hour in debt
    clock.advance(1.01)
    assert lim.take("ip:a") is None  # one second at 60 per minute refills one token, as without the step
    clock.advance(3600 * 5)  # a step forward refills to the burst, never beyond it
    assert lim.take("ip:a") is None and lim.take("ip:a") is None and lim.take("ip:a") is not None


def test_a_clock_step_keeps_replays_refused():
    clock = Clock()
    cache = ReplayCache(100, clock)
    assert cache.check_and_add("k", "n", clock() + 60)
    clock.advance(-3600)  # stepped back: the nonce is remembered for longer, never forgotten early
    assert not cache.check_and_add("k", "n", clock() + 3600 + 60)
    clock.advance(3600 + 30)  # back to where it was, the signature still valid: still a replay
    assert not cache.check_and_add("k", "n", clock() + 30)


# ---------------------------------------------------------------------------------------------
# Headers: security headers, request id, CORS


@pytest.mark.parametrize("config, call, status", [
    ({}, lambda api: api.complete(), 200),
    ({}, lambda api: api.get("/nope"), 404),
    ({"auth": KEYS}, lambda api: api.complete(), 401),
    ({}, lambda api: api.post("/v1/completions", body=b"x", headers={"Content-Type": "text/plain"}), 415),
    ({}, lambda api: api.post("/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}), 200),
])
def test_security_headers_and_request_id_on_every_response(config, call, status):
    api = Api(config)
    r = call(api)
    assert r.status_code == status
    for k, v in SECURITY_HEADERS.items():
        assert r.headers.get(k) == v, k
    assert r.headers["X-Request-Id"]
    assert not any(k.lower().startswith("access-control-") for k in r.headers)


def test_request_id_is_echoed_only_when_well_formed():
    api = Api()
    assert api.complete(headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    rid = api.complete(headers={"X-Request-Id": "bad id\twith junk" + "x" * 100}).headers["X-Request-Id"]
    assert rid != "bad id" and len(rid) == 32


def test_no_cors_headers_by_default():
    api = Api()
    origin = {"Origin": "https://evil.example"}
    r = api.complete(headers=origin)
    assert not any(k.lower().startswith("access-control-") for k in r.headers)
    pre = api.request("OPTIONS", "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert not any(k.lower().startswith("access-control-") for k in pre.headers)


def test_cors_when_configured():
    api = Api({"server": {"cors_origins": ["https://app.example"]}, "auth": KEYS})
    good, bad = {"Origin": "https://app.example"}, {"Origin": "https://evil.example"}
    r = api.complete(headers={**good, **bearer(INFER_KEY)})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    exposed = {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
    assert {"signature", "signature-input", "content-digest", "appliance-request-digest", "x-request-id"} <= exposed  # a browser can verify
    r = api.complete(headers={**bad, **bearer(INFER_KEY)})
    assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    # preflight: browsers never send credentials with it
    pre = api.request("OPTIONS", "/v1/completions", headers={
        **good, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 200, pre.text
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    pre = api.request("OPTIONS", "/v1/completions", headers={**bad, "Access-Control-Request-Method": "POST"})
    assert "Access-Control-Allow-Origin" not in pre.headers
    # a refused request to an allowed origin still carries the CORS header (so the browser sees the 401)
    r = api.complete(headers=good)
    assert r.status_code == 401 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"


# ---------------------------------------------------------------------------------------------
# Request binding details: nonce, 413


def test_nonce_is_bound_and_an_invalid_one_is_a_signed_400():
    api = Api()
    r = api.complete(headers={"appliance-nonce": "my-nonce-1"})
    assert r.status_code == 200
    assert api.verified[-1].covered['"appliance-nonce";req'] == "my-nonce-1"
    with pytest.raises(signing.VerificationError):
        api.verify("POST", "/v1/completions", BODY, {}, r, nonce="my-nonce-2")
    for bad in ("", "x" * 257, "tab\there", "caf\u00e9"):
        raw = bad.encode("latin-1")
        r = api.client.simulate_post("/v1/completions", body=BODY, headers={"Content-Type": "application/json",
                                                                              "appliance-nonce": raw.decode("latin-1")})
        assert r.status_code == 400, (bad, r.status_code, r.text)
        assert "appliance-nonce" in r.json["error"]["message"]
        api.verify("POST", "/v1/completions", BODY, {}, r, nonce=None)  # bound as if no nonce was sent


def test_413_is_bound_to_the_empty_body():
    api = Api({"limits": {"max_body_bytes": 1024}})
    big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
    r = api.request("POST", "/v1/completions", body=big, headers={"Content-Type": "application/json"}, verify=False)
    assert r.status_code == 413
    api.verify("POST", "/v1/completions", b"", {}, r)
    api.verify("POST", "/v1/completions", big, {}, r)  # the verifier substitutes the empty body for a 413
    with pytest.raises(signing.VerificationError):
        api.verify("POST", "/v1/chat/completions", big, {}, r)


def _sha512_digest(body: bytes) -> str:
    return "sha-512=:" + base64.b64encode(hashlib.sha512(body).digest()).decode() + ":"


def _count_submits(api) -> list:
    """Record every generation the engine is asked for (to prove a request was refused before it)."""
    engine = api.registry.get("tiny")
    calls, submit = [], engine.submit
    engine.submit = lambda request: calls.append(request) or submit(request)
    return calls


@pytest.mark.parametrize("digest", [
    signing.content_digest,
    _sha512_digest,
    lambda b: f"{signing.content_digest(b)}, {_sha512_digest(b)}",
])
def test_a_matching_content_digest_binds_the_body_as_a_req_component(digest):
    """spec/signing.md §2.3: the request's own Content-Digest, checked, is covered as "content-digest";req,
    and then no Appliance-Request-Digest is sent; the response verifies only for a client that sent it."""
    api = Api()
    value = digest(BODY)
    r = api.request("POST", "/v1/completions", body=BODY, headers={"Content-Type": "application/json",
                                                                    "Content-Digest": value, "appliance-nonce": "n-cd"})
    assert r.status_code == 200, r.text
    assert signing.REQUEST_DIGEST_HEADER not in {k.lower() for k in r.headers}
    covered = api.verified[-1].covered
    assert covered['"content-digest";req'] == value and '"appliance-request-digest"' not in covered
    assert list(covered) == [
        '"@status"', '"content-type"', '"x-request-id"', '"content-digest"',
        '"@method";req', '"@path";req', '"@query";req', '"content-digest";req', '"appliance-nonce";req', '"@signature-params"',
    ]
    with pytest.raises(signing.VerificationError):  # a client that sent no Content-Digest does not get this answer
        api.verify("POST", "/v1/completions", BODY, {"appliance-nonce": "n-cd"}, r)
    with pytest.raises(signing.VerificationError):  # nor one that sent another body (and its digest)
        other = BODY.replace(b"hi", b"ho")
        api.verify("POST", "/v1/completions", other, {"appliance-nonce": "n-cd", "Content-Digest": digest(other)}, r)


def test_without_a_content_digest_the_response_carries_the_digest_of_the_body_received():
    api = Api()
    r = api.complete(headers={"appliance-nonce": "n-plain"})
    assert r.status_code == 200
    assert r.headers["Appliance-Request-Digest"] == signing.content_digest(BODY)
    covered = api.verified[-1].covered
    assert covered['"appliance-request-digest"'] == signing.content_digest(BODY)
    assert '"content-digest";req' not in covered
    # a GET: the empty body's digest
    r = api.get("/v1/models")
    assert r.headers["Appliance-Request-Digest"] == "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
    # another body, another answer
    with pytest.raises(signing.VerificationError, match="appliance-request-digest: not the digest of the body sent"):
        api.verify("POST", "/v1/completions", BODY + b" ", {}, api.complete())


@pytest.mark.parametrize("value", [
    "sha-256=:" + base64.b64encode(hashlib.sha256(b"another body").digest()).decode() + ":",  # another body's
    "sha-512=:" + base64.b64encode(hashlib.sha512(b"another body").digest()).decode() + ":",
    "md5=:" + base64.b64encode(hashlib.md5(b"x").digest()).decode() + ":",  # an algorithm we cannot check
    "sha-256=:AAAA:",  # the wrong length
    "not a dictionary",
    "",
])
def test_a_content_digest_that_does_not_match_is_a_signed_400_before_inference(value):
    api = Api()
    submits = _count_submits(api)
    headers = {"Content-Type": "application/json", "Content-Digest": value, "appliance-nonce": "n-bad"}
    r = api.request("POST", "/v1/completions", body=BODY, headers=headers)
    err = assert_refused(r, 400, "invalid_request_error")
    assert "Content-Digest" in err["message"] and err["param"] is None
    assert submits == []
    # bound as if no Content-Digest had been sent: to the body received, through Appliance-Request-Digest
    assert r.headers["Appliance-Request-Digest"] == signing.content_digest(BODY)
    api.verify("POST", "/v1/completions", BODY, {"appliance-nonce": "n-bad"}, r)
    # and the same request with its digest right is served
    r = api.request("POST", "/v1/completions", body=BODY, headers={**headers, "Content-Digest": signing.content_digest(BODY)})
    assert r.status_code == 200 and len(submits) == 1


def test_an_invalid_nonce_with_a_matching_content_digest_keeps_the_digest_binding():
    api = Api()
    r = api.client.simulate_post("/v1/completions", body=BODY, headers={
        "Content-Type": "application/json", "Content-Digest": signing.content_digest(BODY), "appliance-nonce": "x" * 300})
    assert r.status_code == 400
    v = api.verify("POST", "/v1/completions", BODY, {"Content-Digest": signing.content_digest(BODY)}, r, nonce=None)
    assert v.covered['"content-digest";req'] == signing.content_digest(BODY)


def test_413_with_a_content_digest_is_bound_to_the_empty_body():
    api = Api({"limits": {"max_body_bytes": 1024}})
    big = json.dumps({"model": "tiny", "prompt": "x" * 5000}).encode()
    headers = {"Content-Type": "application/json", "Content-Digest": signing.content_digest(big)}
    r = api.request("POST", "/v1/completions", body=big, headers=headers, verify=False)
    assert r.status_code == 413
    assert r.headers["Appliance-Request-Digest"] == signing.content_digest(b"")
    api.verify("POST", "/v1/completions", big, headers, r)  # the verifier substitutes the empty body for a 413


@pytest.mark.parametrize("with_digest", [False, True])
def test_stream_headers_bind_the_body_the_same_way(with_digest):
    api = Api()
    body = json.dumps({"model": "tiny", "prompt": "hi", "stream": True}).encode()
    headers = {"Content-Type": "application/json", "appliance-nonce": "n-s"}
    if with_digest:
        headers["Content-Digest"] = signing.content_digest(body)
    r = api.request("POST", "/v1/completions", body=body, headers=headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert api.verified[-1].events
    assert (signing.REQUEST_DIGEST_HEADER in {k.lower() for k in r.headers}) is not with_digest
    with pytest.raises(signing.VerificationError):
        api.verify("POST", "/v1/completions", body.replace(b"hi", b"ho"),
                   {**headers, **({"Content-Digest": signing.content_digest(body.replace(b"hi", b"ho"))} if with_digest else {})}, r)


def test_stream_verifies_and_tampering_is_detected():
    api = Api()
    r = api.post("/v1/completions", {"model": "tiny", "prompt": "hi", "stream": True})
    v = api.verified[-1]
    assert r.status_code == 200 and v.finish_reason and v.events
    tampered = r.content.replace(b"Hello", b"Howdy", 1)
    assert tampered != r.content

    class R:
        status_code = r.status_code
        headers = r.headers
        content = tampered

    with pytest.raises(signing.VerificationError, match="checkpoint .*does not match"):
        api.verify("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "stream": True}).encode(), {}, R)


# ---------------------------------------------------------------------------------------------
# Model loading: confinement to model_policy.dirs, sha256 allowlist


@pytest.fixture
def model_tree(tmp_path):
    models = tmp_path / "models"
    outside = tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    header = b"GGUF" + (3).to_bytes(4, "little") + b"\0" * 56
    (models / "ok.gguf").write_bytes(header)
    (outside / "secret.gguf").write_bytes(header)
    os.symlink(outside / "secret.gguf", models / "escape.gguf")
    os.symlink(outside, models / "linked-dir")
    (models / "sub").mkdir()
    (models / "sub" / "nested.gguf").write_bytes(header)
    return tmp_path


def load(api, path, name="new", **kw):
    return api.post("/load_model", {"model_name": name, "model_path": str(path)}, **kw)


def test_model_path_confinement(model_tree):
    api = Api({"model_policy": {"dirs": [str(model_tree / "models")]}})
    m = model_tree / "models"
    assert load(api, m / "ok.gguf", "a").status_code == 200
    assert load(api, m / "sub" / "nested.gguf", "b").status_code == 200
    err = assert_refused(load(api, f"{m}/sub/../ok.gguf", "c"), 400, "invalid_request_error")
    assert err["param"] == "model_path"
    assert_refused(load(api, f"{m}/../outside/secret.gguf", "c"), 400, "invalid_request_error")
    assert_refused(load(api, "models/ok.gguf", "c"), 400, "invalid_request_error")  # relative
    assert_refused(load(api, model_tree / "outside" / "secret.gguf", "c"), 403, "permission_error")
    assert_refused(load(api, m / "escape.gguf", "c"), 403, "permission_error")  # symlink out of the dir
    assert_refused(load(api, m / "linked-dir" / "secret.gguf", "c"), 403, "permission_error")
    assert_refused(load(api, "/etc/passwd", "c"), 403, "permission_error")
    assert_refused(load(api, f"{m}-evil/ok.gguf", "c"), 403, "permission_error")  # a sibling with the dir as prefix


def test_no_model_dirs_with_keys_configured_forbids_loading(model_tree):
    api = Api({"auth": KEYS})
    r = load(api, model_tree / "models" / "ok.gguf", headers=bearer(ADMIN_KEY))
    err = assert_refused(r, 403, "permission_error")
    assert "model_policy.dirs" in err["message"]


class _StubModel:
    n_params = 1000

    def meta(self, key):
        return None


class _StubEngine:
    def __init__(self, settings, observer, source):
        self.model = _StubModel()
        self.n_ctx = settings.n_ctx
        self.healthy = True
        self.busy_slots = self.queue_depth = 0

    def start(self):
        pass

    def stop(self, timeout=30.0):
        return True

    def host_cache_status(self):
        return None


def test_sha256_allowlist(model_tree):
    m = model_tree / "models"
    allowed = hashlib.sha256((m / "ok.gguf").read_bytes()).hexdigest()
    other = m / "other.gguf"
    other.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\1" * 56)
    truncated = m / "truncated.gguf"
    truncated.write_bytes(b"GGUF\3\0")
    config = {"model_policy": {"dirs": [str(m)], "allowed_sha256": [allowed]}}
    settings = Settings.model_validate(config)
    registry = ModelRegistry(engine_factory=_StubEngine, allowed_sha256=frozenset(settings.model_policy.allowed_sha256))
    api = Api(config, registry=registry)
    err = assert_refused(load(api, other, "other"), 403, "permission_error")
    assert "sha256" in err["message"]
    assert_refused(load(api, truncated, "trunc"), 400, "invalid_request_error")
    r = load(api, m / "ok.gguf", "ok")
    assert r.status_code == 200, r.text
    assert r.json["model"]["sha256"] == allowed
    assert [x.name for x in registry.records() if x.state == "ready"] == ["ok"]


# ---------------------------------------------------------------------------------------------
# Startup refusal


def test_off_loopback_without_keys_refuses_to_start(capsys):
    from appliance.cli import main

    assert main(["--host", "0.0.0.0", "-p", "0"]) == 2
    err = capsys.readouterr().err
    assert "auth" in err and "off loopback" in err
    assert main(["serve", "--host", "10.1.2.3", "-p", "0"]) == 2


def test_every_response_in_this_module_verified():
    """A guard on the harness itself: `Api.request` verifies, and a tampered response fails it."""
    api = Api({"auth": KEYS})
    r = api.complete()
    assert r.status_code == 401 and api.verified

    class Tampered:
        status_code = 403
        headers = r.headers
        content = r.content

    with pytest.raises(signing.VerificationError):
        api.verify("POST", "/v1/completions", BODY, {}, Tampered)
