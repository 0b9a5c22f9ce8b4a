"""The original appliance README's curl examples, run verbatim (only host:port and the model path change)."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from appliance_it import sha256_file

pytestmark = pytest.mark.integration

SEED_CURL = Path(__file__).resolve().parents[1] / "fixtures" / "seed_curl.txt"
SEED_HOSTPORT = "127.0.0.1:3000"
SEED_MODEL_PATH = "/path/to/llama3-8b.gguf"


def _commands() -> list[str]:
    lines = [ln.strip() for ln in SEED_CURL.read_text().splitlines() if ln.strip().startswith("curl ")]
    assert len(lines) == 3, f"{SEED_CURL} should hold the three README curl commands, has {lines}"
    return lines


def _curl(command: str) -> tuple[int, dict]:
    argv = shlex.split(command)
    # Output-only options appended after the verbatim command: fail loudly on transport errors and
    # print the status code on a last line; the request itself is exactly the README's.
    argv += ["--silent", "--show-error", "--max-time", "120", "--write-out", "\n%{http_code}"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"curl failed ({done.returncode}): {done.stderr}\n{command}"
    body, _, code = done.stdout.rpartition("\n")
    return int(code), json.loads(body)


def test_readme_curl_examples(start_server, model_files):
    assert shutil.which("curl"), "the real curl binary is required on PATH for this test"
    load_cmd, completion_cmd, status_cmd = _commands()
    assert "/load_model" in load_cmd and "/completions" in completion_cmd and "/status" in status_cmd

    server = start_server(wait="health", name="seed-curl")  # the README starts the server without models
    model = model_files.main

    def localize(cmd: str) -> str:
        assert SEED_HOSTPORT in cmd
        return cmd.replace(SEED_HOSTPORT, server.hostport).replace(SEED_MODEL_PATH, str(model))

    # 2. Load a model
    status, body = _curl(localize(load_cmd))
    assert status == 200, body
    assert body["status"] == "loaded"
    assert body["model"]["name"] == "llama3-8b"
    assert body["model"]["state"] == "ready"
    assert body["model"]["path"] == str(model)

    # 3. Perform inference
    status, body = _curl(localize(completion_cmd))
    assert status == 200, body
    assert body["object"] == "text_completion"
    assert body["model"] == "llama3-8b"
    assert body["id"].startswith("cmpl-")
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] == "length"  # test models never emit EOS
    assert body["usage"]["completion_tokens"] == 10
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 10

    # Same seed, same text: the README's request is reproducible.
    status, again = _curl(localize(completion_cmd))
    assert status == 200 and again["choices"][0]["text"] == choice["text"]

    # 4. Get status
    status, body = _curl(localize(status_cmd))
    assert status == 200, body
    models = {m["name"]: m for m in body["models"]}
    assert "llama3-8b" in models, body
    entry = models["llama3-8b"]
    assert entry["state"] == "ready"
    assert entry["sha256"] == sha256_file(model)
    assert entry["size"] == model.stat().st_size
