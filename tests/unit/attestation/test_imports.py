"""The verifier stands alone: importing the client-side package pulls in nothing of the server.

`attestation` is its own distribution (attestation/pyproject.toml) with only the verifier's
dependencies; the server's (llama.cpp, Falcon, gunicorn, gevent) must never be imported by it, even
indirectly. Checked in a fresh interpreter, so no other test's imports are in sys.modules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULES = ["attestation", "attestation.client", "attestation.verify", "attestation.cli", "attestation.signing"]
FORBIDDEN = ("appliance", "llama_cpp", "falcon", "gunicorn", "gevent")

CODE = """
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps(sorted(sys.modules)))
"""


def test_verifier_imports_nothing_of_the_server() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CODE.format(modules=MODULES)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    assert set(MODULES) <= set(loaded)
    leaked = [m for m in loaded if m.split(".")[0] in FORBIDDEN]
    assert leaked == [], leaked
