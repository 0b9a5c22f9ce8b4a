"""The committed web UI (appliance/web/ui/) is exactly what `npm ci && npm run build` makes from ui/:
the attested `ui_sha256` names bytes anyone can rebuild from the sources and the lockfile."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILT = ROOT / "appliance" / "web" / "ui"
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "network request")


def test_committed_build_equals_a_fresh_build(tmp_path: Path) -> None:
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.skip("node and npm are not installed: the UI build cannot be reproduced here")
    src = tmp_path / "ui"
    shutil.copytree(ROOT / "ui", src, ignore=shutil.ignore_patterns("node_modules"))
    ci = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=src, capture_output=True, text=True, timeout=600)
    if ci.returncode != 0:
        if any(marker in ci.stderr for marker in _OFFLINE):
            pytest.skip(f"npm ci cannot reach the registry: {ci.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"npm ci failed:\n{ci.stderr[-3000:]}")
    out = tmp_path / "out"
    build = subprocess.run([npm, "run", "build"], cwd=src, capture_output=True, text=True, timeout=600,
                           env={"PATH": str(Path(node).parent) + ":/usr/bin:/bin", "APPLIANCE_UI_OUT": str(out)})
    assert build.returncode == 0, build.stderr[-3000:]
    fresh = {p.name: p.read_bytes() for p in out.iterdir()}
    committed = {p.name: p.read_bytes() for p in BUILT.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(committed) == ["app.css", "app.js", "index.html", "manifest.json"]
    for name in fresh:
        assert fresh[name] == committed[name], f"{name} differs from a fresh build: run `npm ci && npm run build` in ui/"


def test_manifest_lists_every_file_with_its_digest_and_sri() -> None:
    import base64
    import hashlib

    manifest = (BUILT / "manifest.json").read_bytes()
    doc = json.loads(manifest)
    assert manifest == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    for name, entry in doc["files"].items():
        data = (BUILT / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["integrity"] == "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode()
        assert entry["size"] == len(data)
    html = (BUILT / "index.html").read_text()
    for name in ("app.js", "app.css"):
        assert f'integrity="{doc["files"][name]["integrity"]}"' in html
    assert "<script>" not in html and "<style" not in html and " style=" not in html
