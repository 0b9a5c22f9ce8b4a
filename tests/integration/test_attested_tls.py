"""Attested TLS: `[server] tls = "attested"` serves HTTPS with a key made in memory at boot, its
public key digest in the claims; `appliance verify --attested-tls` pins it instead of trusting a CA."""

from __future__ import annotations

import ssl
import subprocess
import time

import pytest
import requests
from appliance_it import ROOT, server_command

from attestation.client import StdlibHTTP, VerificationError, _spki_sha256, attest
from attestation.policy import Policy

pytestmark = pytest.mark.integration

MODEL = "m"
CONFIG = """
[server]
tls = "attested"
[attestation]
provider = "simulated"
rate_per_minute = 0
"""


def _wait_https(server, timeout: float = 60.0) -> str:
    url = f"https://127.0.0.1:{server.port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.proc.poll() is None, server.logs()
        try:
            if requests.get(url + "/readiness", timeout=2, verify=False).status_code == 200:
                return url
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError("the TLS server never became ready\n" + server.logs())


@pytest.fixture(scope="module")
def tls_server(start_server, model_files):
    server = start_server(models={MODEL: model_files.main}, config=CONFIG, name="tls", wait=None)
    return server, _wait_https(server)


@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
def test_the_attested_key_is_the_served_key(tls_server):
    server, url = tls_server
    with pytest.raises(requests.exceptions.SSLError):  # self-signed: no CA vouches for it
        requests.get(url + "/health", timeout=10)
    pem = ssl.get_server_certificate(("127.0.0.1", server.port))
    served = _spki_sha256(ssl.PEM_cert_to_DER_cert(pem))
    http = StdlibHTTP(attested_tls=True)
    appliance = attest(url, policy=Policy(allow_simulated=True), http=http)
    assert appliance.claims["tls_public_key_sha256"] == served
    assert any(f.name == "tls-key" and f.status == "pass" for f in appliance.report.factors)
    # Pinned to another key: refused before any request byte is sent.
    http.pin_spki_sha256 = "00" * 32
    with pytest.raises(VerificationError, match="not the attested one"):
        http.open("POST", url + "/v1/completions", {"Content-Type": "application/json"}, b'{"secret": "prompt"}')
    # Not pinned yet: only the attestation document may be fetched.
    with pytest.raises(VerificationError, match="attest first"):
        StdlibHTTP(attested_tls=True).open("GET", url + "/v1/models", {})


def test_verify_cli_pins_attested_tls(tls_server):
    _, url = tls_server
    cmd = [*server_command(), "verify"]
    ok = subprocess.run([*cmd, url, "--attested-tls", "--allow-simulated", "--complete", "Hello"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "tls-key" in ok.stdout and "signature: verified" in ok.stdout
    no_pin = subprocess.run([*cmd, url, "--allow-simulated"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert no_pin.returncode != 0  # a CA-checking client cannot even reach it
