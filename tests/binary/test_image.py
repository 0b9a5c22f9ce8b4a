"""The container image (build/image.py, `make image`): reproducible, read by skopeo and umoci, serving from a
read-only root as its own user, with an SBOM that names what went in.

The CPU image is built twice from the binary under test, the second time from a copy with another mtime,
under another umask and time zone. No container runtime: umoci unpacks the image into a runtime bundle,
and its process (user, arguments, environment) runs under chroot in a private mount namespace with the
root bind-mounted read-only, a tmpfs on /tmp and /dev, as `docker run --read-only --tmpfs /tmp:exec` does.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from appliance.digests import file_sha256

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
IMAGE_PY = ROOT / "build" / "image.py"
READY_TIMEOUT = float(os.environ.get("APPLIANCE_TEST_READY_TIMEOUT", "60"))

REVISION = "0123456789abcdef0123456789abcdef01234567"
SOURCE = "https://example.invalid/appliance"
TAG = "test-cpu"
USER = "65532:65532"
LIB_DIR = "usr/lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class Built:
    layout: Path
    archive: Path
    sbom: Path
    digest: str
    stdout: str

    def blob(self, digest: str) -> Path:
        return self.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def manifest(self) -> dict:
        return json.loads(self.blob(self.digest).read_bytes())

    def config(self) -> dict:
        return json.loads(self.blob(self.manifest()["config"]["digest"]).read_bytes())

    def layer(self) -> Path:
        (layer,) = self.manifest()["layers"]
        return self.blob(layer["digest"])


def build_image(
    binary: Path, out: Path, epoch: int, *, env: dict[str, str] | None = None, variant: str = "cpu", umask: int = 0o022
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        "sh", "-c", f'umask {umask:03o} && exec "$@"', "sh",
        sys.executable, str(IMAGE_PY), "--variant", variant, "--binary", str(binary),
        "--layout", str(out / "layout"), "--archive", str(out / "image.oci.tar"), "--sbom", str(out / "sbom.spdx.json"),
        "--revision", REVISION, "--source", SOURCE, "--tag", TAG, "--source-date-epoch", str(epoch),
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, **(env or {})}, cwd=out)


def _built(out: Path, proc: subprocess.CompletedProcess) -> Built:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digest = proc.stdout.split()[0]
    assert digest.startswith("sha256:") and len(digest) == 71, proc.stdout
    return Built(out / "layout", out / "image.oci.tar", out / "sbom.spdx.json", digest, proc.stdout)


@pytest.fixture(scope="module")
def epoch(manifest: dict) -> int:
    return int(manifest["build"]["source_date_epoch"]) or 1_700_000_000


@pytest.fixture(scope="module")
def images(binary: Path, epoch: int, tmp_path_factory: pytest.TempPathFactory) -> tuple[Built, Built]:
    first_dir = tmp_path_factory.mktemp("image-a")
    first = _built(first_dir, build_image(binary, first_dir, epoch))
    # The same inputs by another road: a copy of the binary (another path and mtime), another umask and time
    # zone, and a SOURCE_DATE_EPOCH in the environment that --source-date-epoch overrides.
    second_dir = tmp_path_factory.mktemp("image-b")
    copy = second_dir / "in" / binary.name
    copy.parent.mkdir()
    for suffix in ("", ".sha256", ".manifest.json"):
        shutil.copyfile(binary.with_name(binary.name + suffix), copy.with_name(copy.name + suffix))
    copy.chmod(0o700)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    env = {"TZ": "Pacific/Kiritimati", "SOURCE_DATE_EPOCH": "1"}
    return first, _built(second_dir, build_image(copy, second_dir, epoch, env=env, umask=0o077))


def test_two_builds_give_the_same_image(images: tuple[Built, Built]):
    a, b = images
    assert a.digest == b.digest
    assert file_sha256(a.archive) == file_sha256(b.archive)
    assert a.sbom.read_bytes() == b.sbom.read_bytes()
    assert sorted(p.name for p in (a.layout / "blobs" / "sha256").iterdir()) == sorted(
        p.name for p in (b.layout / "blobs" / "sha256").iterdir()
    )
    # Every blob is what its name says, and nothing else lies in the layout.
    for p in (a.layout / "blobs" / "sha256").iterdir():
        assert file_sha256(p) == p.name
    assert sorted(p.name for p in a.layout.iterdir()) == ["blobs", "index.json", "oci-layout"]
    index = json.loads((a.layout / "index.json").read_text())
    assert [(m["digest"], m["annotations"]["org.opencontainers.image.ref.name"]) for m in index["manifests"]] == [
        (a.digest, TAG)
    ]


def test_layer_headers_hold_nothing_of_the_build_machine(images: tuple[Built, Built], binary: Path, epoch: int):
    built = images[0]
    raw = built.layer().read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00", "gzip without a file name or other optional fields"
    assert raw[4:8] == b"\0\0\0\0", "gzip mtime 0"
    assert hashlib.sha256(gzip.decompress(raw)).hexdigest() == built.config()["rootfs"]["diff_ids"][0].removeprefix(
        "sha256:"
    )
    tar_cmd = shutil.which("tar")
    if tar_cmd:  # GNU tar is stricter than Go's reader (umoci's own layers fail here: no end-of-archive blocks)
        out = subprocess.run([tar_cmd, "-tzf", str(built.layer())], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
    with tarfile.open(built.layer(), "r:gz") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) and len(set(names)) == len(names)
    for m in members:
        assert (m.uid, m.gid, m.uname, m.gname, m.mtime) == (0, 0, "", "", epoch), m.name
        assert m.pax_headers == {}, m.name
        assert not m.name.startswith(("/", "./")), m.name
    by_name = {m.name: m for m in members}
    app = by_name["usr/local/bin/appliance"]
    assert (app.size, app.mode) == (binary.stat().st_size, 0o755)
    assert by_name["tmp"].isdir() and by_name["tmp"].mode == 0o1777
    for lib in ("libc.so.6", "libz.so.1", "ld-linux-x86-64.so.2"):
        assert by_name[f"{LIB_DIR}/{lib}"].isfile(), lib
    assert by_name["lib64"].issym() and by_name["lib64"].linkname == "usr/lib64"
    assert by_name["etc/ssl/certs/ca-certificates.crt"].size > 0
    # Nothing to run but the appliance: no shell, no package manager.
    assert not any(n.startswith(("bin/", "sbin/", "usr/bin/", "usr/sbin/")) for n in names)


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _skopeo() -> str:
    path = shutil.which("skopeo")
    if path is None:
        pytest.skip("no skopeo (apt-get install skopeo)")
    return path


def test_skopeo_reads_labels_user_and_entrypoint(images: tuple[Built, Built], manifest: dict, epoch: int):
    skopeo = _skopeo()
    built = images[0]
    out = subprocess.run([skopeo, "inspect", f"oci:{built.layout}:{TAG}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["Digest"] == built.digest
    assert (info["Architecture"], info["Os"]) == ("amd64", "linux")
    labels = info["Labels"]
    assert labels["org.opencontainers.image.revision"] == REVISION
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert labels["org.opencontainers.image.created"] == _iso(epoch) == info["Created"]
    assert labels["org.opencontainers.image.version"] == manifest["build"]["appliance"]
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.title"] and labels["org.opencontainers.image.description"]
    assert labels["dev.appliance.binary.sha256"] == manifest["binary"]["sha256"]
    assert labels["dev.appliance.variant"] == "cpu"

    # The archive is the same image: what `skopeo copy oci-archive:...` and `podman load` read.
    out = subprocess.run(
        [skopeo, "inspect", "--config", f"oci-archive:{built.archive}"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    config = json.loads(out.stdout)
    assert config == built.config()
    c = config["config"]
    assert c["User"] == USER
    assert c["Entrypoint"] == ["/usr/local/bin/appliance"]
    assert c["Cmd"] == ["-p", "3000", "--host", "0.0.0.0"]
    assert c["ExposedPorts"] == {"3000/tcp": {}}
    assert "TMPDIR=/tmp" in c["Env"]
    assert config["created"] == _iso(epoch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare_mounts() -> bool:
    unshare = shutil.which("unshare")
    return bool(unshare) and subprocess.run([unshare, "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces and chroot need root")
def test_serves_from_a_read_only_root_as_its_user(
    images: tuple[Built, Built], binary: Path, manifest: dict, embedded: dict, tmp_path: Path
):
    umoci = shutil.which("umoci")
    chroot = shutil.which("chroot") or shutil.which("chroot", path="/usr/sbin:/sbin")
    if umoci is None:
        pytest.skip("no umoci (apt-get install umoci)")
    if chroot is None or not _can_unshare_mounts():
        pytest.skip("needs chroot and `unshare --mount` (root with CAP_SYS_ADMIN)")
    built = images[0]
    bundle = tmp_path / "bundle"
    out = subprocess.run(
        [umoci, "unpack", "--image", f"{built.layout}:{TAG}", str(bundle)], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    rootfs = bundle / "rootfs"
    assert file_sha256(rootfs / "usr/local/bin/appliance") == manifest["binary"]["sha256"]
    assert "appliance:x:65532:65532:" in (rootfs / "etc/passwd").read_text()

    # The process a runtime would start, as umoci's runtime spec gives it, on a private port and loopback.
    process = json.loads((bundle / "config.json").read_text())["process"]
    assert (process["user"]["uid"], process["user"]["gid"]) == (65532, 65532)
    args = list(process["args"])
    assert args == ["/usr/local/bin/appliance", "-p", "3000", "--host", "0.0.0.0"]
    port = _free_port()
    args[args.index("-p") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    assert "TMPDIR=/tmp" in process["env"]

    r = str(rootfs)
    script = (
        f"mount --bind {r} {r} && mount -o remount,bind,ro,nosuid,nodev {r} "
        f"&& mount -t tmpfs -o mode=1777,nosuid,nodev,size=512m tmpfs {r}/tmp "
        f"&& mount -t tmpfs -o mode=755,nosuid,size=64k tmpfs {r}/dev "
        f"&& mknod -m 666 {r}/dev/null c 1 3 && mknod -m 666 {r}/dev/zero c 1 5 && mknod -m 666 {r}/dev/urandom c 1 9 "
        f"&& mount -t proc -o nosuid,nodev,noexec proc {r}/proc || exit 99; "
        'exec "$@"'
    )
    # Only the image's environment reaches the appliance; sh, mount and chroot run with the host's.
    run = [shutil.which("env") or "/usr/bin/env", "-i", *process["env"], chroot, f"--userspec={USER}", r, *args]
    stderr = tmp_path / "stderr.log"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [shutil.which("unshare") or "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script, "sh", *run],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def log() -> str:
        return stderr.read_text(errors="replace")[-3000:]

    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if requests.get(f"{url}/readiness", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.1)
        if proc.poll() == 99:
            pytest.skip(f"cannot set up the mounts here: {log()}")
        assert proc.poll() is None, log()
        assert requests.get(f"{url}/health", timeout=10).status_code == 200
        r_ = requests.post(
            f"{url}/v1/completions",
            json={"model": embedded["name"], "prompt": "Hello", "max_tokens": 8, "seed": 3},
            timeout=60,
        )
        assert r_.status_code == 200, r_.text
        body = r_.json()
        assert body["usage"]["completion_tokens"] >= 1
        assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]

        # It is the image's user, and its root is read-only (the extraction went to the tmpfs).
        status = Path(f"/proc/{proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65532"] * 4
        mounts = Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()
        root_opts = next(line.split()[5] for line in mounts if line.split()[4] == "/")
        assert "ro" in root_opts.split(","), root_opts
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(45)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
    assert rc == 0, log()
    assert list((rootfs / "tmp").iterdir()) == []


def _layer_file(built: Built, path: str) -> bytes:
    with tarfile.open(built.layer(), "r:gz") as tar:
        f = tar.extractfile(path)
        assert f is not None, path
        return f.read()


def test_sbom_names_the_binary_the_wheels_and_the_debian_packages(images: tuple[Built, Built], manifest: dict):
    built = images[0]
    raw = built.sbom.read_bytes()
    assert _layer_file(built, "usr/share/doc/appliance/sbom.spdx.json") == raw
    assert (
        json.loads(_layer_file(built, f"usr/share/doc/appliance/{manifest['binary']['name']}.manifest.json"))
        == manifest
    )
    doc = json.loads(raw)
    assert (doc["spdxVersion"], doc["dataLicense"], doc["SPDXID"]) == ("SPDX-2.3", "CC0-1.0", "SPDXRef-DOCUMENT")
    assert doc["documentNamespace"].startswith("https://") and doc["creationInfo"]["creators"]
    packages = {p["SPDXID"]: p for p in doc["packages"]}
    assert len(packages) == len(doc["packages"]), "SPDX ids are unique"
    for rel in doc["relationships"]:
        assert {rel["spdxElementId"], rel["relatedSpdxElement"]} <= {*packages, "SPDXRef-DOCUMENT"}, rel
    described = [r["relatedSpdxElement"] for r in doc["relationships"] if r["relationshipType"] == "DESCRIBES"]
    assert [packages[d]["primaryPackagePurpose"] for d in described] == ["CONTAINER"]

    binary_sha = manifest["binary"]["sha256"]
    (binary_pkg,) = [
        p for p in packages.values() if {"algorithm": "SHA256", "checksumValue": binary_sha} in p.get("checksums", [])
    ]
    contained = {r["relatedSpdxElement"] for r in doc["relationships"] if r["spdxElementId"] == binary_pkg["SPDXID"]}

    purls = {
        ref["referenceLocator"]: p for p in packages.values() for ref in p.get("externalRefs", [])
        if ref["referenceType"] == "purl"
    }  # fmt: skip
    for name, version in manifest["build"]["packages"].items():
        assert f"pkg:pypi/{name}@{version}" in purls, name
    llama = purls[f"pkg:pypi/llama-cpp-python@{manifest['build']['llama_cpp_python']['version']}"]
    assert llama["SPDXID"] in contained
    for lib, digest in manifest["build"]["llama_cpp_python"]["libraries"].items():
        assert digest in raw.decode(), lib
    if manifest.get("model"):
        assert manifest["model"]["sha256"] in raw.decode()

    if shutil.which("dpkg-query") is None:
        pytest.skip("no dpkg here: the Debian packages are not checked")
    for deb in ("libc6", "zlib1g", "ca-certificates"):
        version = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", deb], capture_output=True, text=True, check=True
        ).stdout
        (pkg,) = [p for p in packages.values() if p["name"] == deb]
        assert pkg["versionInfo"] == version, deb
        assert any(
            r["relatedSpdxElement"] == pkg["SPDXID"] and r["spdxElementId"] == "SPDXRef-Image"
            for r in doc["relationships"]
        )


def test_cuda_image_refused_without_its_binary(tmp_path: Path):
    out = build_image(tmp_path / "dist" / "appliance-cuda", tmp_path / "out", 1_700_000_000, variant="cuda")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no cuda binary" in out.stderr and "make binary-cuda" in out.stderr
    assert not (tmp_path / "out" / "layout").exists() and not (tmp_path / "out" / "image.oci.tar").exists()


def test_cpu_binary_is_not_made_into_a_cuda_image(binary: Path, tmp_path: Path):
    out = build_image(binary, tmp_path / "out", 1_700_000_000, variant="cuda")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "is a cpu build, not cuda" in out.stderr
    assert not (tmp_path / "out" / "layout").exists()
