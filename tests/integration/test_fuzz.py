"""The short, seeded version of `make fuzz` (tests/fuzz/run.py): schemathesis against spec/openapi.yaml
and a real server, every phase and check on, plus the appliance's own checks (tests/fuzz/hooks.py: every
response signed, stream events in the spec, /readiness's one allowed 503). Then the regressions for what
the fuzz found that needs a real server; the others live beside the code they fixed (see the README's
"Abuse and faults").
"""

from __future__ import annotations

import base64
import re
import socket
import time

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.fuzz.run import SERVER_CONFIG, fuzz

pytestmark = pytest.mark.integration

EXAMPLES = 10  # cases per operation and phase: ~2,500 requests, ~1 min here
SEED = 1


@pytest.fixture(scope="module")
def fuzz_server(start_server, model_files):
    server = start_server(models={"m": model_files.main}, config=SERVER_CONFIG, name="fuzz")
    yield server
    server.stop()


def test_seeded_fuzz_finds_nothing(fuzz_server, model_files):
    result = fuzz(fuzz_server.url, model_name="m", model_path=model_files.main, examples=EXAMPLES, seed=SEED,
                  timeout=900)
    tail = result.output[-6000:]
    assert result.cases > 1000, tail  # the run really generated requests
    assert result.failures == 0 and result.returncode == 0, tail
    assert result.healthy_after and result.no_worker_restart, tail
    assert requests.get(fuzz_server.url + "/readiness", timeout=10).status_code == 200  # the model was kept


def test_the_signature_check_bites(fuzz_server, model_files, monkeypatch):
    """With a key that is not the server's, every response must fail tests/fuzz/hooks.py's signature check:
    the check runs and can fail."""
    wrong = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    monkeypatch.setenv("APPLIANCE_FUZZ_PUBLIC_KEY", base64.b64encode(wrong).decode())
    result = fuzz(fuzz_server.url, model_name="m", model_path=model_files.main, examples=1, seed=SEED,
                  timeout=300, extra=["--include-path", "/health", "--phases", "fuzzing"])
    assert result.failures > 0 and result.returncode != 0, result.output[-3000:]
    assert "the response signature does not verify" in result.output


def _metric(server, name: str, **labels: str) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}\{{(.*)\}} ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_client_gone_before_a_plain_answer_is_499_not_500(fuzz_server, model_files):
    """Found by the fuzz: a client that timed out waiting for a non-streamed answer was counted as a 500
    (the generation was cancelled, and the resource took the missing Done for a server error)."""
    route = "/v1/chat/completions"
    r = requests.post(fuzz_server.url + "/load_model", timeout=120,
                      json={"model_name": "long", "model_path": str(model_files.main), "n_ctx": 16384, "parallel": 1})
    assert r.status_code == 200, r.text  # a context long enough that the answer takes seconds
    errors_500 = _metric(fuzz_server, "appliance_request_errors_total", route=route, status="500")
    body = b'{"model": "long", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16000, "ignore_eos": true}'
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=10) as s:
        s.sendall(b"POST " + route.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.5)  # generating; then the client gives up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _metric(fuzz_server, "appliance_request_errors_total", route=route, status="499") < 1:
        time.sleep(0.2)
    assert _metric(fuzz_server, "appliance_request_errors_total", route=route, status="499") >= 1
    assert _metric(fuzz_server, "appliance_request_errors_total", route=route, status="500") == errors_500
    assert requests.get(fuzz_server.url + "/health", timeout=5).status_code == 200
    assert requests.post(fuzz_server.url + "/unload_model", json={"model_name": "long"}, timeout=60).status_code == 200
