"""The verifier stands alone: the appliance-attestation wheel, installed into a clean venv with only its
own dependencies (attestation/requirements.lock, pinned by hash: the verifier's and the [openai]
extra's), attests a real running appliance, verifies a completion made through the openai wrapper
(and, independently, its signature with `verify_response`), and its CLI verifies the appliance, a
completion and a saved transcript -- with none of the server's packages importable there.

The venv is built once per session under pytest's tmp dir (pip's own cache makes the install quick).
The wheel is built from a copy of attestation/, so the checkout gets no build/ or egg-info.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from appliance_it import ROOT, Server

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "m"
CONFIG = """
[attestation]
provider = "simulated"
rate_per_minute = 0
"""
SERVER_ONLY = ("appliance", "llama_cpp", "falcon", "gunicorn", "gevent")

# Runs inside the clean venv: attest, a completion (and a stream) through the verifying openai
# client, the completion's signature checked again with the public API, and a transcript for the CLI.
CLIENT_SCRIPT = r'''
import base64, json, sys

from attestation.client import attest, verified_openai_client
from attestation.policy import Policy
from attestation.signing import NONCE_HEADER, RequestInfo, verify_response

url, model, transcript_path = sys.argv[1:4]
policy = Policy(allow_simulated=True)
appliance = attest(url, policy=policy)
assert appliance.report.ok and appliance.models == [model], appliance.table()

client = verified_openai_client(url, policy=policy, max_retries=0, timeout=120.0)
raw = client.completions.with_raw_response.create(model=model, prompt="Hello", max_tokens=8, seed=1)
completion = raw.parse()
assert completion.choices[0].text and completion.usage.completion_tokens > 0
http, req = raw.http_response, raw.http_response.request
info = RequestInfo(req.method, req.url.raw_path.decode("ascii"), req.content, req.headers[NONCE_HEADER])
verified = verify_response(
    appliance.signing_key, request=info, status=http.status_code, headers=dict(http.headers), body=http.content
)
assert verified.key_id == appliance.kid and verified.body == http.content

chunks = list(client.completions.create(model=model, prompt="Once", max_tokens=8, seed=1, stream=True))
assert "".join(c.choices[0].text for c in chunks if c.choices)
client.close()

with open(transcript_path, "w") as f:
    json.dump({
        "request": {"method": info.method, "target": info.target, "nonce": info.nonce,
                    "body_b64": base64.b64encode(info.body).decode()},
        "response": {"status": http.status_code, "headers": dict(http.headers),
                     "body_b64": base64.b64encode(http.content).decode()},
    }, f)
print(json.dumps({"kid": appliance.kid, "public_key": appliance.claims["signing_key"]["public_key"]}))
'''


def _env() -> dict[str, str]:
    """The environment without anything that would reach back into this checkout or its venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: Path, what: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env=_env(), timeout=timeout,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, f"{what}: exit {out.returncode}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def verifier_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean venv (no system site-packages) with the attestation wheel and its locked dependencies."""
    base = tmp_path_factory.mktemp("verifier")
    src, dist, venv = base / "src", base / "dist", base / "venv"
    shutil.copytree(ROOT / "attestation", src, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(dist)],
         base, "building the attestation wheel")
    (wheel,) = dist.glob("appliance_attestation-*.whl")
    _run([sys.executable, "-m", "venv", str(venv)], base, "creating the venv")
    py = str(venv / "bin" / "python")
    _run([py, "-m", "pip", "install", "-q", "--require-hashes", "--no-deps", "-r", str(ROOT / "attestation" / "requirements.lock")],
         base, "installing attestation/requirements.lock")
    _run([py, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], base, "installing the wheel")
    _run([py, "-m", "pip", "check"], base, "pip check (every dependency of the wheel and its extra is locked)")
    return venv


@pytest.fixture(scope="module")
def verifier_server(start_server, model_files) -> Server:
    return start_server(models={MODEL: model_files.main}, config=CONFIG, name="verifier")


def test_the_venv_holds_the_verifier_and_nothing_of_the_server(verifier_venv, tmp_path):
    code = (
        "import importlib.util, json, sys, attestation, attestation.client, attestation.cli, openai\n"
        f"print(json.dumps({{'file': attestation.__file__, 'prefix': sys.prefix, 'base': sys.base_prefix,\n"
        f"  'found': [n for n in {SERVER_ONLY!r} if importlib.util.find_spec(n) is not None]}}))\n"
    )
    out = _run([str(verifier_venv / "bin" / "python"), "-c", code], tmp_path, "importing in the clean venv")
    got = json.loads(out.stdout)
    assert got["found"] == [], f"server packages importable in the verifier's venv: {got['found']}"
    assert Path(got["file"]).is_relative_to(verifier_venv), got  # the installed wheel, not this checkout
    assert Path(got["prefix"]) == verifier_venv and got["base"] != got["prefix"]
    cfg = (verifier_venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def test_the_standalone_verifier_against_a_real_appliance(verifier_venv, verifier_server, tmp_path):
    bin_ = verifier_venv / "bin"
    url = verifier_server.url

    # The library: attest, the openai wrapper, verify_response.
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    transcript = tmp_path / "transcript.json"
    out = _run([str(bin_ / "python"), str(script), url, MODEL, str(transcript)], tmp_path, "the client script", 300)
    key = json.loads(out.stdout.splitlines()[-1])

    # The CLI, as attestation/README.md documents it: the console script and `python -m attestation`.
    out = _run([str(bin_ / "appliance-attestation"), "verify", url, "--allow-simulated", "--complete", "Hello",
                "--max-tokens", "8"], tmp_path, "appliance-attestation verify", 300)
    assert "result: OK" in out.stdout and out.stdout.rstrip().endswith("signature: verified"), out.stdout
    out = _run([str(bin_ / "python"), "-m", "attestation", "verify", url, "--allow-simulated", "--complete", "Hello",
                "--stream", "--max-tokens", "8"], tmp_path, "python -m attestation verify --stream", 300)
    assert "signature: verified (stream" in out.stdout, out.stdout
    out = _run([str(bin_ / "appliance-attestation"), "verify-response", str(transcript), "--public-key",
                key["public_key"]], tmp_path, "appliance-attestation verify-response")
    assert out.stdout.startswith(f"OK: signed by {key['kid']}"), out.stdout

    # Without the opt-in for simulated evidence the CLI refuses (exit 1), still from the clean venv.
    refused = subprocess.run([str(bin_ / "appliance-attestation"), "verify", url], capture_output=True, text=True,
                             cwd=tmp_path, env=_env(), timeout=300)
    assert refused.returncode == 1 and "result: FAILED (provider)" in refused.stdout, refused.stdout + refused.stderr
