"""The TEE interface vanishing or failing (issue 21's fault table): attestation answers 503,
completions keep working, and /status says so; when the interface comes back, so does attestation.

In-process: the real app, middleware and attestor; a provider whose interface can be taken away,
and the fake engine from the root conftest."""

from __future__ import annotations

import falcon.testing

from appliance.evidence import Evidence, MeasurementEvent, ProviderError, SimulatedProvider
from appliance.settings import Settings
from appliance.web.app import create_app
from tests.conftest import FIXED_NOW, FakeRegistry

NONCE = "ab" * 32


class Flaky:
    """The simulated provider, whose interface can vanish (as configfs-tsm's does when the guest
    driver is unloaded, or Nitro's /dev/nsm when the device goes away)."""

    name = "simulated"

    def __init__(self) -> None:
        self.inner = SimulatedProvider()
        self.gone = False

    def evidence(self, report_data: bytes) -> Evidence:
        if self.gone:
            raise ProviderError("/sys/kernel/config/tsm/report: No such file or directory")
        return self.inner.evidence(report_data)

    def extend(self, event: MeasurementEvent) -> bool:
        return self.inner.extend(event)


def _client() -> tuple[falcon.testing.TestClient, Flaky]:
    registry = FakeRegistry()
    registry.add("tiny")
    provider = Flaky()
    settings = Settings.model_validate({"attestation": {"provider": "simulated", "rate_per_minute": 0}})
    app, _ = create_app(settings, models=registry, provider=provider, wall_clock=lambda: FIXED_NOW)
    return falcon.testing.TestClient(app), provider


def test_a_vanished_tee_interface_is_a_503_while_completions_go_on_and_status_says_so():
    client, provider = _client()
    assert client.simulate_get("/status").json["attestation"] == {
        "provider": "simulated", "evidence": "untried", "error": None, "checked_at": None}
    assert client.simulate_get("/v1/attestation", params={"nonce": NONCE}).status_code == 200
    assert client.simulate_get("/status").json["attestation"]["evidence"] == "ok"

    provider.gone = True
    r = client.simulate_get("/v1/attestation", params={"nonce": NONCE})
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready"
    assert "unavailable" in r.json["error"]["message"] and "tsm" not in r.json["error"]["message"]
    assert r.headers.get("Retry-After") == "1" and r.headers.get("Signature")
    done = client.simulate_post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 4})
    assert done.status_code == 200 and done.json["choices"][0]["text"]
    status = client.simulate_get("/status").json["attestation"]
    assert status["evidence"] == "unavailable" and "No such file" in status["error"]
    assert status["checked_at"] == FIXED_NOW

    provider.gone = False
    assert client.simulate_get("/v1/attestation", params={"nonce": NONCE}).status_code == 200
    assert client.simulate_get("/status").json["attestation"] == {
        "provider": "simulated", "evidence": "ok", "error": None, "checked_at": FIXED_NOW}


def test_status_without_attestation_says_disabled():
    registry = FakeRegistry()
    registry.add("tiny")
    app, _ = create_app(Settings.model_validate({"attestation": {"provider": "none"}}), models=registry,
                        wall_clock=lambda: FIXED_NOW)
    status = falcon.testing.TestClient(app).simulate_get("/status").json
    assert status["attestation"] == {"provider": "none", "evidence": "disabled", "error": None, "checked_at": None}
