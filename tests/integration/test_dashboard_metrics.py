"""The Grafana dashboard (deploy/grafana/dashboards/appliance.json) against a real appliance: after
traffic that observes every kind of series (a streamed completion: first token and inter-token gaps; an
attestation request), GET /metrics declares every metric family a panel queries."""

from __future__ import annotations

import re

import pytest

from tests.dashboard_metrics import dashboard_metric_names

pytestmark = pytest.mark.integration

_TYPE = re.compile(r"^# TYPE (\S+) (counter|gauge|histogram|summary|untyped|info|stateset|gaugehistogram|unknown)$",
                   re.M)


def declared_families(exposition: str) -> dict[str, str]:
    """{name: type} from the `# TYPE` lines (counters as exported, with `_total`)."""
    return {m[1]: m[2] for m in _TYPE.finditer(exposition)}


def test_every_metric_the_dashboard_queries_is_exported(server):
    with server.openai() as client:
        stream = client.completions.create(model="m", prompt="Count to ten:", max_tokens=8, stream=True, seed=1)
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text
    r = server.get("/v1/attestation", params={"nonce": "ab" * 32})
    assert r.status_code == 200, r.text

    metrics = server.get("/metrics")
    assert metrics.status_code == 200, metrics.text
    families = declared_families(metrics.text)
    assert families, metrics.text[:2000]

    wanted = dashboard_metric_names()
    missing = sorted(wanted - set(families))
    assert not missing, f"the dashboard queries {len(missing)} families GET /metrics does not declare: {missing}"
    for name in wanted:
        if name.endswith("_seconds"):
            assert families[name] == "histogram", (name, families[name])


def test_the_health_command_a_container_healthcheck_runs(server):
    """`appliance health URL` (compose's healthcheck: the image has no curl): 0 on 200, else 1."""
    import subprocess
    import sys

    def health(url: str) -> int:
        return subprocess.run([sys.executable, "-m", "appliance", "health", url, "--timeout", "5"],
                              capture_output=True, timeout=60).returncode

    assert health(server.url + "/health") == 0
    assert health(server.url + "/no-such-route") == 1
    assert health("http://127.0.0.1:9/health") == 1  # nothing listens on the discard port
    assert health("file:///etc/passwd") == 2
