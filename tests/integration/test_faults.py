"""Faults from the reliability issue that need a real server of their own (the others live beside the
code they exercise: test_lifecycle SIGTERM, test_worker_restart SIGKILL and files changed on disk,
tests/unit/evidence/test_tee_vanishing, tests/unit/trust/test_auth clock steps). The README's "Abuse and
faults" table lists them all.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
import requests
from appliance_it import free_port, server_command, wait_for

pytestmark = pytest.mark.integration


def test_logs_on_a_full_disk_lose_nothing_served(model_files, tmp_path):
    """The disk where the logs go is full (stdout and stderr are /dev/full: every write fails with
    ENOSPC). The server still starts, serves, signs and exits 0 on SIGTERM: a log line that cannot be
    written is dropped, never an error for a client or a dead worker. (No state is persisted to disk
    yet; the conversations issue adds some, and its own test.)"""
    port = free_port()
    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen([*server_command(), "-p", str(port), "--model", f"m={model_files.main}"],
                                stdout=full, stderr=full, stdin=subprocess.DEVNULL, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        def ready() -> bool:
            try:
                return requests.get(url + "/readiness", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(ready, 120, interval=0.2, what="the server, logging to a full disk, to get ready")
        for _ in range(3):
            r = requests.post(url + "/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4}, timeout=60)
            assert r.status_code == 200 and r.headers.get("Signature"), r.text
        r = requests.post(url + "/v1/completions", json={"model": "m", "prompt": 5}, timeout=30)
        assert r.status_code == 400  # an error path logs too
        r = requests.post(url + "/v1/completions", timeout=60, stream=True,
                          json={"model": "m", "prompt": "hi", "max_tokens": 8, "stream": True})
        assert r.status_code == 200 and b"data: [DONE]" in b"".join(r.iter_content(chunk_size=None))
        assert "appliance_worker_restarts_total 0.0" in requests.get(url + "/metrics", timeout=10).text
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    assert rc == 0


def test_a_context_that_cannot_fit_is_refused_at_load(start_server, model_files):
    """n_ctx x parallel whose KV cache exceeds the memory left: a clear 400 at load (param n_ctx, code
    insufficient_memory, the numbers), before llama.cpp allocates and clears it; not the OOM killer
    taking the worker and every model in it. The server keeps serving its other model."""
    server = start_server(models={"m": model_files.main}, name="too-big")
    r = server.post("/load_model", json={"model_name": "huge", "model_path": str(model_files.other),
                                         "n_ctx": 1 << 20, "parallel": 256})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n_ctx" and err["code"] == "insufficient_memory", err
    assert "GiB of KV cache" in err["message"] and "free here" in err["message"], err
    st = {m["name"]: m for m in server.get("/status").json()["models"]}
    assert st["huge"]["state"] == "failed" and "KV cache" in st["huge"]["error"]
    r = server.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert "appliance_worker_restarts_total 0.0" in server.get("/metrics").text
