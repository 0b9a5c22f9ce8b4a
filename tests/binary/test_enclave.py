"""enclave/: what can be checked without a TEE (no binary needed, so these run in `make test` too)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jinja2
import pytest

from appliance.settings import load_settings
from attestation.measurements import model_event, replay
from attestation.policy import load_policy

ROOT = Path(__file__).resolve().parents[2]
ENCLAVE = ROOT / "enclave"
SHA_BIN = "ab" * 32
SHA_MODEL = "cd" * 32


class _Gramine:
    """Stands in for gramine-manifest's `gramine` template object."""

    libos = "/usr/lib/x86_64-linux-gnu/gramine/libsysdb.so"

    @staticmethod
    def runtimedir(libc: str = "glibc") -> str:
        return f"/usr/lib/x86_64-linux-gnu/gramine/runtime/{libc}"


def render_gramine(**defines) -> dict:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string((ENCLAVE / "gramine" / "appliance.manifest.template").read_text())
    text = template.render(gramine=_Gramine, arch_libdir="/lib/x86_64-linux-gnu", appliance_dir="/srv/appliance", **defines)
    return tomllib.loads(text)


def test_gramine_manifest_renders_to_valid_toml():
    m = render_gramine(binary_sha256=SHA_BIN)
    assert m["sgx"]["remote_attestation"] == "dcap"
    assert m["sgx"]["debug"] is False
    assert m["libos"]["entrypoint"] == "/appliance/appliance"
    trusted = m["sgx"]["trusted_files"]
    assert {"uri": "file:/srv/appliance/appliance", "sha256": SHA_BIN} in trusted
    assert "file:/srv/appliance/config.toml" in trusted
    assert {"path": "/tmp", "type": "tmpfs"} in m["fs"]["mounts"]
    assert m["loader"]["env"]["TMPDIR"] == "/tmp"
    assert m["sys"]["enable_sigterm_injection"] is True
    assert "--model" not in m["loader"]["argv"]


def test_gramine_manifest_with_an_external_model():
    m = render_gramine(binary_sha256=SHA_BIN, model_path="/models/llama3.gguf", model_name="llama3", model_sha256=SHA_MODEL)
    assert {"uri": "file:/models/llama3.gguf", "sha256": SHA_MODEL} in m["sgx"]["trusted_files"]
    assert {"path": "/models/llama3.gguf", "uri": "file:/models/llama3.gguf"} in m["fs"]["mounts"]
    argv = m["loader"]["argv"]
    assert argv[argv.index("--model") + 1] == "llama3=/models/llama3.gguf"


@pytest.mark.parametrize("path", ["cvm/config.toml", "nitro/config.toml", "gramine/config.toml"])
def test_example_configs_validate(path):
    settings = load_settings(ENCLAVE / path)
    assert settings.auth.api_keys, "a TEE deployment is reachable by the host: keys required"


def test_nitro_entrypoint_is_valid_sh():
    subprocess.run(["sh", "-n", str(ENCLAVE / "nitro" / "entrypoint.sh")], check=True)
    text = (ENCLAVE / "nitro" / "entrypoint.sh").read_text()
    assert "VSOCK-LISTEN:${VSOCK_PORT}" in text and "TCP4:127.0.0.1:${PORT}" in text


def test_systemd_unit_verifies():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here")
    out = subprocess.run(
        ["systemd-analyze", "verify", str(ENCLAVE / "cvm" / "appliance.service")], capture_output=True, text=True
    )
    # The only complaint allowed: the binary is not installed at /usr/lib/appliance on this machine.
    problems = [
        line for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "/usr/lib/appliance/appliance is not executable" not in line
    ]
    assert problems == []



def test_cvm_tmpfiles_gives_the_sealed_copies_huge_pages(tmp_path):
    """systemd-tmpfiles, as at boot, sets the shmem THP mode the appliance checks (modelfile) to within_size."""
    if shutil.which("systemd-tmpfiles") is None:
        pytest.skip("no systemd-tmpfiles here")
    from appliance.engine.modelfile import _SHMEM_THP

    knob = tmp_path / _SHMEM_THP.relative_to("/")
    knob.parent.mkdir(parents=True)
    knob.write_text("never")  # a plain file: tmpfiles overwrites it in place, as sysfs takes a write
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={tmp_path}", str(ENCLAVE / "cvm" / "appliance-tmpfiles.conf")],
                   check=True, capture_output=True)
    assert knob.read_text().strip() == "within_size"

def test_expected_values_from_a_manifest(tmp_path):
    manifest = {
        "build": {"variant": "cpu"},
        "binary": {"name": "appliance", "sha256": SHA_BIN, "size": 1},
        "model": {"name": "demo", "sha256": SHA_MODEL, "size": 1},
    }
    path = tmp_path / "appliance.manifest.json"
    path.write_text(json.dumps(manifest))
    out = subprocess.run(
        [sys.executable, str(ENCLAVE / "expected.py"), str(path), "--target", "tdx",
         "--model", f"m2={'ef' * 32}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(out)
    policy = load_policy(policy_file)
    assert policy.binary_sha256 == (SHA_BIN,)
    assert policy.model_sha256 == (SHA_MODEL, "ef" * 32)
    assert policy.required_models == ("demo", "m2")
    want = replay([model_event("demo", SHA_MODEL), model_event("m2", "ef" * 32)]).hex()
    assert want in out
