"""The frozen binary: manifest, embedded model, run-time models, extraction and portability."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

from appliance.digests import file_sha256 as sha256_file
from attestation.policy import Policy, load_policy

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_manifest_describes_the_binary(binary: Path, manifest: dict):
    assert set(manifest) == {"build", "binary", "model"}
    assert manifest["binary"]["name"] == binary.name
    assert manifest["binary"]["size"] == binary.stat().st_size
    assert manifest["binary"]["sha256"] == sha256_file(binary)
    sidecar = binary.with_name(binary.name + ".sha256").read_text().split()
    assert sidecar == [manifest["binary"]["sha256"], binary.name]
    build = manifest["build"]
    for key in ("appliance", "variant", "source_commit", "python", "pyinstaller", "llama_cpp_python", "packages"):
        assert build.get(key), key
    assert "-DGGML_NATIVE=OFF" in build["llama_cpp_python"]["cmake_flags"]
    # The source fixes compiled in, by digest (the AMX tile-configuration fix among them).
    patches = build["llama_cpp_python"]["patches"]
    assert set(patches) == {p.name for p in (ROOT / "scripts" / "patches").glob("*.patch")} >= {"ggml-amx-tile-config.patch"}
    assert all(len(d) == 64 for d in patches.values())
    # The manifest is a policy source for verifiers, as attestation/policy.py documents.
    path = binary.with_name(binary.name + ".manifest.json")
    policy = load_policy(path)
    assert policy == Policy.from_manifest(path)
    assert policy.binary_sha256 == (manifest["binary"]["sha256"],)


def test_version_needs_no_python(binary: Path):
    env = {"PATH": "/nonexistent", "HOME": "/nonexistent", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}
    out = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("appliance ")


def test_embedded_model_served_out_of_the_box(run_binary, manifest: dict, embedded: dict):
    srv = run_binary()
    models = srv.get("/status").json()["models"]
    assert [m["name"] for m in models] == [embedded["name"]]
    assert models[0]["sha256"] == embedded["sha256"]
    assert models[0]["size"] == embedded["size"]
    r = srv.post("/v1/completions", json={"model": embedded["name"], "prompt": "Hello", "max_tokens": 4, "seed": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1

    # The claims name this very file and the embedded model's digest.
    r = srv.get("/v1/attestation", params={"nonce": secrets.token_hex(32)})
    if r.status_code == 404:
        pytest.skip("no /v1/attestation in this build")
    assert r.status_code == 200, r.text
    claims = r.json()["claims"]
    assert claims["binary"] == {"kind": "frozen", "sha256": manifest["binary"]["sha256"]}
    # Read once into sealed memory (mmap: false), like any model wherever an attestation provider is active.
    assert {"name": embedded["name"], "sha256": embedded["sha256"], "mmap": False} in claims["models"]


def test_run_time_models_still_work(run_binary, embedded: dict, other_model: Path):
    srv = run_binary("--model", f"m={other_model}")
    # /readiness needs one ready model: wait until both are.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {m["name"]: m["state"] for m in srv.get("/status").json()["models"]}
        if states == {embedded["name"]: "ready", "m": "ready"}:
            break
        time.sleep(0.1)
    assert states == {embedded["name"]: "ready", "m": "ready"}
    r = srv.post("/load_model", json={"model_name": "m2", "model_path": str(other_model)})
    assert r.status_code == 200, r.text
    names = {m["id"] for m in srv.get("/v1/models").json()["data"]}
    assert names == {embedded["name"], "m", "m2"}


def test_configured_model_of_the_same_name_wins(run_binary, embedded: dict, other_model: Path):
    srv = run_binary("--model", f"{embedded['name']}={other_model}")
    models = srv.get("/status").json()["models"]
    assert [(m["name"], m["sha256"]) for m in models] == [(embedded["name"], sha256_file(other_model))]


def test_no_default_model(run_binary, other_model: Path):
    srv = run_binary("--no-default-model", wait="health")
    assert srv.get("/status").json()["models"] == []
    assert srv.get("/readiness").status_code == 503
    r = srv.post("/load_model", json={"model_name": "m", "model_path": str(other_model)})
    assert r.status_code == 200, r.text
    assert srv.get("/readiness").status_code == 200


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_exit_0_and_extraction_dir_removed(run_binary, sig):
    srv = run_binary("--no-default-model", wait="health")
    unpacked = [p.name for p in srv.tmpdir.iterdir()]
    assert len(unpacked) == 1 and unpacked[0].startswith("_MEI"), unpacked
    assert srv.stop(sig) == 0, srv.stderr()[-2000:]
    assert list(srv.tmpdir.iterdir()) == []


def test_noexec_tmp_needs_tmpdir(binary: Path):
    """With /tmp mounted noexec the default extraction fails; TMPDIR elsewhere works (README)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare --mount` (root with CAP_SYS_ADMIN)")
    if Path("/tmp") in binary.resolve().parents:
        pytest.skip("the binary itself lives under /tmp")
    exec_dir = Path(tempfile.mkdtemp(prefix="appliance-exec-tmp-", dir="/var/tmp"))  # outside the new /tmp
    try:
        script = (
            "mount -t tmpfs -o noexec,nosuid,nodev tmpfs /tmp || exit 99; "
            f"env -u TMPDIR {binary} --version; echo rc=$?; "
            f"TMPDIR={exec_dir} {binary} --version; echo rc=$?"
        )
        out = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True, timeout=120)
        if out.returncode == 99:
            pytest.skip("cannot mount a tmpfs here")
        text = out.stdout + out.stderr
        rcs = [line for line in out.stdout.splitlines() if line.startswith("rc=")]
        assert rcs[0] != "rc=0" and "failed to map segment" in text, text
        assert rcs[1] == "rc=0", text
        assert list(exec_dir.iterdir()) == []
    finally:
        shutil.rmtree(exec_dir, ignore_errors=True)


GLIBC_LIBS = ("libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1", "libutil.so.1")


@pytest.mark.skipif(os.geteuid() != 0, reason="chroot needs root")
def test_serves_in_a_chroot_with_only_glibc_and_zlib(binary: Path, embedded: dict, tmp_path: Path):
    """No Python, no venv: the root holds the binary, glibc, zlib (the bootloader's only needs) and /dev/null."""
    root = tmp_path / "root"
    libdir = root / "lib" / "x86_64-linux-gnu"
    libdir.mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "tmp").mkdir(mode=0o1777)
    (root / "bin").mkdir()
    (root / "dev").mkdir()
    try:  # llama_cpp opens os.devnull at import
        os.mknod(root / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chmod(root / "dev" / "null", 0o666)
    except OSError as e:
        pytest.skip(f"cannot make /dev/null in the chroot: {e}")
    for name in (*GLIBC_LIBS, "libz.so.1"):
        src = Path("/lib/x86_64-linux-gnu") / name
        if not src.exists():
            pytest.skip(f"no {src} on this machine")
        shutil.copy(src.resolve(), libdir / name)
    shutil.copy(Path("/lib64/ld-linux-x86-64.so.2").resolve(), root / "lib64" / "ld-linux-x86-64.so.2")
    shutil.copy(binary, root / "bin" / "appliance")
    port = free_port()
    chroot = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
    if chroot is None:
        pytest.skip("no chroot command")
    try:
        proc = subprocess.Popen(
            [chroot, str(root), "/bin/appliance", "-p", str(port)],
            env={"PATH": "/bin"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
    except OSError as e:
        pytest.skip(f"chroot: {e}")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/readiness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": embedded["name"], "prompt": "Hi", "max_tokens": 3}, timeout=60,
        )
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(45) == 0
    assert list((root / "tmp").iterdir()) == []


def test_verify_command_accepts_itself(binary: Path, run_binary, manifest: dict, embedded: dict):
    """`appliance verify` (bundled) against the running binary, with the build manifest as policy."""
    help_text = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=60).stdout
    if "verify" not in help_text.split("{", 1)[-1].split("}", 1)[0].split(","):
        pytest.skip("this build has no `verify` command")
    srv = run_binary()
    policy = binary.with_name(binary.name + ".manifest.json")
    out = subprocess.run(
        [str(binary), "verify", srv.url, "--policy", str(policy), "--allow-simulated"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
