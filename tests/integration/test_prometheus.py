"""A real Prometheus (Debian's `prometheus`, started here on loopback) scrapes a real appliance with a
`metrics`-scope key, and the series come back through Prometheus's HTTP query API. A scrape job with a
wrong path sees the appliance's 404 (target down, the status in its last error)."""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import time

import pytest
import requests

from tests.integration.conftest import free_port, wait_for

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
TOKEN = "sk-scrape-" + secrets.token_urlsafe(24)
USER = "sk-user-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def scraped(start_server, model_files, tmp_path_factory):
    if PROMETHEUS is None:
        pytest.skip("Debian's prometheus is not installed (apt-get install prometheus; scripts/system-deps.sh)")
    config = f"""
[[auth.api_keys]]
name = "scraper"
sha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"
scopes = ["metrics"]

[[auth.api_keys]]
name = "user"
sha256 = "{hashlib.sha256(USER.encode()).hexdigest()}"
scopes = ["inference"]
"""
    server = start_server(models={"m": model_files.main}, config=config, name="scraped")
    work = tmp_path_factory.mktemp("prometheus")
    (work / "token").write_text(TOKEN)
    target = f"127.0.0.1:{server.port}"
    (work / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: appliance
    metrics_path: /metrics
    authorization:
      credentials_file: {work / "token"}
    static_configs:
      - targets: ["{target}"]
  - job_name: wrong-path
    metrics_path: /metricz
    authorization:
      credentials_file: {work / "token"}
    static_configs:
      - targets: ["{target}"]
""")
    check = subprocess.run([shutil.which("promtool") or "promtool", "check", "config", str(work / "prometheus.yml")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    port = free_port()
    log = open(work / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
    )
    api = f"http://127.0.0.1:{port}/api/v1"

    def ready() -> bool:
        assert proc.poll() is None, (work / "prometheus.log").read_text()[-3000:]
        try:
            return requests.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    wait_for(ready, 60, what="prometheus ready")
    yield server, api
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def query(api: str, promql: str) -> list[dict]:
    r = requests.get(f"{api}/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_the_appliance_and_reads_the_series_back(scraped):
    server, api = scraped
    auth = {"Authorization": f"Bearer {USER}"}
    for seed in (1, 2, 3):
        r = requests.post(server.url + "/v1/completions", headers=auth, timeout=60,
                          json={"model": "m", "prompt": "Count", "max_tokens": 6, "seed": seed})
        assert r.status_code == 200, r.text
    # a scrape after the traffic: up, and the 18 generated tokens counted
    deadline = time.monotonic() + 60
    while True:
        tokens = query(api, 'appliance_generation_tokens_total{job="appliance",model="m"}')
        if tokens and float(tokens[0]["value"][1]) >= 18:
            break
        assert time.monotonic() < deadline, f"no scrape with the tokens in 60 s: {tokens}"
        time.sleep(0.5)
    assert [float(x["value"][1]) for x in query(api, 'up{job="appliance"}')] == [1.0]
    ok = query(api, 'appliance_requests_total{job="appliance",route="/v1/completions",status="200"}')
    assert ok and float(ok[0]["value"][1]) >= 3
    # the histograms an operator's dashboard plots, computed by Prometheus itself
    for hist in ("appliance_time_to_first_token_seconds", "appliance_e2e_request_latency_seconds",
                 "appliance_request_queue_time_seconds", "appliance_inter_token_latency_seconds"):
        count = query(api, f'{hist}_count{{job="appliance",model="m"}}')
        assert count and float(count[0]["value"][1]) >= 3, hist
        p50 = query(api, f'histogram_quantile(0.5, sum by (le) ({hist}_bucket{{job="appliance"}}))')
        assert p50 and float(p50[0]["value"][1]) >= 0, hist
    loaded = query(api, 'appliance_models_loaded{job="appliance"}')
    assert [float(x["value"][1]) for x in loaded] == [1.0]
    # no _created series reached Prometheus
    assert query(api, '{job="appliance", __name__=~".+_created"}') == []


def test_a_scrape_of_a_wrong_path_is_a_404_and_the_target_is_down(scraped):
    server, api = scraped

    def wrong_path_down() -> bool:
        r = requests.get(f"{api}/targets", timeout=10).json()
        t = [t for t in r["data"]["activeTargets"] if t["labels"]["job"] == "wrong-path"]
        return bool(t) and t[0]["health"] == "down" and "404" in t[0]["lastError"]

    wait_for(wrong_path_down, 30, what="the wrong-path target down with a 404")
    assert [float(x["value"][1]) for x in query(api, 'up{job="wrong-path"}')] == [0.0]
    # and the same, asked directly: the wrong path 404, the wrong method 405, both OpenAI-shaped
    headers = {"Authorization": f"Bearer {TOKEN}"}
    r = requests.get(server.url + "/metricz", headers=headers, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["type"]
    r = requests.post(server.url + "/metrics", headers=headers, timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"]
    # the scraper's key reads metrics and nothing else
    r = requests.post(server.url + "/v1/completions", headers=headers, json={"model": "m", "prompt": "x"}, timeout=10)
    assert r.status_code == 403
