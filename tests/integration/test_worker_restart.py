"""A dead worker loses nothing: the gunicorn master keeps the desired models, a new worker loads them all.

One server for the module (each restart costs a worker boot and the model loads on two cores); each
test reads the restart counter before and after, so they hold in any order.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
import requests
from appliance_it import sse_events, wait_for

pytestmark = pytest.mark.integration

LATE = {"model_name": "late", "n_ctx": 2048, "parallel": 3}
BACK_TIMEOUT = 90.0


# ---------------------------------------------------------------------------------------------
# Processes


def _children() -> dict[int, list[int]]:
    """ppid -> pids, from /proc (no psutil)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def worker_pid(server) -> int | None:
    """The gunicorn worker: the deepest process under the server's (a onefile binary adds a bootloader
    parent above the master; the worker forks nothing)."""
    kids = _children()
    pid, depth, best = server.proc.pid, 0, None
    frontier = [(server.proc.pid, 0)]
    while frontier:
        pid, depth = frontier.pop()
        below = kids.get(pid, [])
        if not below and depth > 0 and (best is None or depth > best[1]):
            best = (pid, depth)
        frontier.extend((c, depth + 1) for c in below)
    return best[0] if best else None


def restarts(server) -> tuple[float, dict[str, float]]:
    text = server.get("/metrics").text
    total = re.search(r"^appliance_worker_restarts_total (\S+)$", text, re.M)
    assert total, "no appliance_worker_restarts_total in /metrics"
    by_cause = {m[1]: float(m[2]) for m in re.finditer(r'^appliance_worker_restarts_by_cause_total\{cause="([^"]+)"\} (\S+)$', text, re.M)}
    return float(total[1]), by_cause


def master_logs(server) -> list[dict]:
    out = []
    for line in server.stderr().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def kill_and_wait_back(server, sig: int, names: set[str]) -> dict:
    """Signal the worker; poll /readiness until 200. Returns timings and what /readiness said."""
    old = worker_pid(server)
    assert old is not None and old != server.proc.pid
    os.kill(old, sig)
    t0 = time.monotonic()
    seen: list[int] = []
    new = None
    while time.monotonic() - t0 < BACK_TIMEOUT:
        assert server.proc.poll() is None, f"the master exited\n{server.logs()}"
        try:
            r = requests.get(server.url + "/readiness", timeout=5, headers={"Connection": "close"})
            seen.append(r.status_code)
            if r.status_code == 200:
                new = worker_pid(server)
                if new not in (None, old):  # not an answer from the old worker, before the signal landed
                    break
        except requests.RequestException:
            pass
        time.sleep(0.02)
    else:
        raise AssertionError(f"not ready again {BACK_TIMEOUT}s after {sig!r}: /readiness said {seen[-5:]}\n{server.logs()}")
    back = time.monotonic() - t0
    got = {m["id"] for m in server.get("/v1/models").json()["data"]}
    assert got == names, got
    return {"old": old, "new": new, "seconds": back, "seen": seen}


@pytest.fixture(scope="module")
def rserver(start_server, model_files):
    server = start_server(
        config=f'[[models]]\nname = "m"\npath = "{model_files.main}"\nparallel = 2\nn_ctx = 1024\n', name="restart"
    )
    r = server.post("/load_model", json={**LATE, "model_path": str(model_files.other)})
    assert r.status_code == 200, r.text
    yield server
    server.stop()


def _model_status(server, name: str) -> dict:
    s = server.status_of(name)
    return {k: s[k] for k in ("path", "sha256", "n_ctx", "slots", "state")}


# ---------------------------------------------------------------------------------------------


def test_sigkill_mid_stream_then_every_model_is_back(rserver):
    server = rserver
    before = {n: _model_status(server, n) for n in ("m", "late")}
    assert before["late"]["slots"] == 3 and before["late"]["state"] == "ready"
    total0, causes0 = restarts(server)
    log0 = server.get("/v1/attestation", params={"nonce": "ab" * 32}).json()["event_log"]
    assert len(log0) >= 2, log0  # m and late were measured

    # A stream in flight on the model loaded at run time.
    r = requests.post(
        server.url + "/v1/completions",
        json={"model": "late", "prompt": "Tell me everything", "max_tokens": 1900, "ignore_eos": True, "stream": True},
        stream=True, timeout=(5, 15), headers={"Connection": "close"},
    )
    assert r.status_code == 200, r.text
    events = sse_events(r.iter_lines())
    assert isinstance(next(events), dict) and isinstance(next(events), dict)

    old = worker_pid(server)
    os.kill(old, signal.SIGKILL)
    t_kill = time.monotonic()
    rest: list = []
    ended_by = "end of stream"
    try:
        for e in events:
            rest.append(e)
    except requests.exceptions.Timeout as e:  # a hang: what must never happen
        pytest.fail(f"the stream hung after the worker died: {e!r}")
    except requests.RequestException as e:
        ended_by = type(e).__name__
    finally:
        r.close()
    stream_end = time.monotonic() - t_kill
    assert "[DONE]" not in rest, "the stream finished: the kill came too late to test anything"
    assert stream_end < 5, f"the stream took {stream_end:.1f}s to end after the worker died"
    print(f"stream ended {stream_end:.3f}s after SIGKILL ({ended_by}, {len(rest)} more events)")

    # /readiness: 503 while the models load again, then 200.
    seen: list[int] = []
    while True:
        assert time.monotonic() - t_kill < BACK_TIMEOUT, f"not ready again: {seen[-5:]}\n{server.logs()}"
        try:
            rr = requests.get(server.url + "/readiness", timeout=5, headers={"Connection": "close"})
            seen.append(rr.status_code)
            if rr.status_code == 503:
                assert rr.json()["error"]["code"] == "not_ready"
            if rr.status_code == 200 and worker_pid(server) != old:
                break
        except requests.RequestException:
            pass
        time.sleep(0.02)
    back = time.monotonic() - t_kill
    assert 503 in seen, f"/readiness never said 503 while the models loaded again: {seen}"
    assert set(rr.json()["models"]) == {"m", "late"}, rr.json()
    print(f"every desired model back {back:.2f}s after SIGKILL (/readiness said {seen.count(503)}x 503 first)")

    # Both models, with the settings they had; the runtime one serves.
    assert {m["id"] for m in server.get("/v1/models").json()["data"]} == {"m", "late"}
    assert {n: _model_status(server, n) for n in ("m", "late")} == before
    c = server.post("/v1/completions", json={"model": "late", "prompt": "Hello", "max_tokens": 8, "seed": 1})
    assert c.status_code == 200, c.text
    assert c.json()["usage"]["completion_tokens"] == 8

    # The runtime measurement log keeps what the dead worker extended (the register does), then the reloads.
    log1 = server.get("/v1/attestation", params={"nonce": "cd" * 32}).json()["event_log"]
    assert log1[: len(log0)] == log0 and len(log1) == len(log0) + 2, (log0, log1)

    total, causes = restarts(server)
    assert total == total0 + 1
    assert causes.get("SIGKILL", 0) == causes0.get("SIGKILL", 0) + 1
    died = [e for e in master_logs(server) if e.get("logger") == "appliance.server" and e.get("cause") == "SIGKILL"]
    assert died and died[-1]["pid"] == old and died[-1]["level"] == "error", died
    assert "killed by SIGKILL (perhaps the OOM killer)" in died[-1]["msg"], died[-1]
    assert any("desired model(s) back" in e.get("msg", "") for e in master_logs(server)), server.stderr()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL], ids=["SIGSEGV", "SIGILL"])
def test_native_crash_signals_are_named_and_models_come_back(rserver, sig):
    """The signals llama.cpp dies of. A request in flight (not streamed) ends with its connection."""
    import threading

    total0, causes0 = restarts(rserver)
    ended: dict = {}

    def run() -> None:
        try:
            r = requests.post(rserver.url + "/v1/completions", timeout=(5, 30), headers={"Connection": "close"},
                              json={"model": "m", "prompt": "Go on", "max_tokens": 900, "ignore_eos": True})
            ended["how"] = f"HTTP {r.status_code}"
        except requests.exceptions.Timeout as e:
            ended["how"] = f"hang: {e!r}"
        except requests.RequestException as e:
            ended["how"] = type(e).__name__
        ended["at"] = time.monotonic()

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: rserver.status_of("m")["busy_slots"] >= 1, 20, what="the request to start generating")
    t_kill = time.monotonic()
    out = kill_and_wait_back(rserver, sig, {"m", "late"})
    t.join(10)
    assert ended.get("how") == "ConnectionError", ended
    assert ended["at"] - t_kill < 5, f"the request ended {ended['at'] - t_kill:.1f}s after {sig.name}"
    print(f"{sig.name}: in-flight request ended {ended['at'] - t_kill:.3f}s after the signal ({ended['how']}); "
          f"every desired model back {out['seconds']:.2f}s after it")
    total, causes = restarts(rserver)
    assert total == total0 + 1 and causes.get(sig.name, 0) == causes0.get(sig.name, 0) + 1, causes
    died = [e for e in master_logs(rserver) if e.get("cause") == sig.name and e.get("pid") == out["old"]]
    assert died and f"killed by {sig.name}" in died[-1]["msg"], died
    assert rserver.status_of("late")["slots"] == 3
    (cpu,) = [d for d in rserver.get("/status").json()["devices"] if d["type"] == "cpu"]
    if sig == signal.SIGILL:
        # An illegal instruction while serving, past the probe: the new worker does not choose that
        # build again (here: the same build without its extra buffers), and says why.
        assert cpu["extra_buffers"] is False, cpu
        assert cpu["probes"][0] == {"module": cpu["module"], "extra_buffers": True, "ok": False, "seconds": 0.0,
                                    "detail": "not tried: it killed a worker with SIGILL while serving"}, cpu
        assert cpu["reason"].startswith("fallback: "), cpu
        assert any("will not choose it again" in e.get("msg", "") for e in master_logs(rserver)), rserver.stderr()[-2000:]
    else:  # a crash elsewhere is no reason to leave the build
        assert cpu["extra_buffers"] is True and cpu["reason"] == "the best build for this CPU; its probe passed", cpu


def test_worker_that_exits_by_itself_is_replaced(rserver):
    """SIGTERM to the worker alone (not the master): it exits 0 after draining; the master did not ask
    for that, so it is a restart like any other."""
    total0, causes0 = restarts(rserver)
    out = kill_and_wait_back(rserver, signal.SIGTERM, {"m", "late"})
    total, causes = restarts(rserver)
    assert total == total0 + 1 and causes.get("exit_0", 0) == causes0.get("exit_0", 0) + 1, causes
    died = [e for e in master_logs(rserver) if e.get("cause") == "exit_0" and e.get("pid") == out["old"]]
    assert died and "exited with code 0" in died[-1]["msg"], died


def test_unloaded_model_stays_unloaded_after_a_restart(rserver, model_files):
    r = rserver.post("/unload_model", json={"model_name": "late"})
    assert r.status_code == 200, r.text
    try:
        kill_and_wait_back(rserver, signal.SIGKILL, {"m"})
        assert "late" not in {m["name"] for m in rserver.get("/status").json()["models"]}
    finally:  # put it back for any test that runs after this one
        r = rserver.post("/load_model", json={**LATE, "model_path": str(model_files.other)})
        assert r.status_code == 200, r.text


def test_master_shutdown_is_not_a_restart(start_server, model_files):
    server = start_server(models={"m": model_files.main}, name="restart-shutdown")
    assert restarts(server)[0] == 0
    assert server.stop() == 0
    assert not [e for e in master_logs(server) if e.get("restarts")], server.stderr()[-2000:]


def test_hung_worker_is_replaced_and_counted_as_a_timeout(start_server, model_files):
    """A worker that stops answering (SIGSTOP here; a native call that never returns in life) misses its
    heartbeats: the master sends SIGABRT, then SIGKILL, and the new worker loads the models again."""
    server = start_server(models={"m": model_files.main}, config="[server]\nworker_timeout = 3\n", name="restart-hung")
    try:
        out = kill_and_wait_back(server, signal.SIGSTOP, {"m"})
        print(f"hung worker replaced and its model back {out['seconds']:.2f}s after SIGSTOP")
        total, causes = restarts(server)
        assert total == 1 and causes == {"timeout": 1}, causes
        died = [e for e in master_logs(server) if e.get("cause") == "timeout"]
        assert died and died[-1]["pid"] == out["old"] and "hung (no heartbeat" in died[-1]["msg"], died
        assert "OOM" not in died[-1]["msg"]
    finally:
        server.stop()


def test_a_file_changed_on_disk_is_not_reloaded_after_a_restart(start_server, model_files, tmp_path):
    """Fault: a model file replaced on disk while served. The digest each desired model was loaded with is
    pinned, so the new worker re-checks it: the changed file is refused and reported (/status error,
    /readiness 503, the log), never served under the old digest; the untouched model comes back."""
    import shutil

    configured = tmp_path / "configured.gguf"
    runtime = tmp_path / "runtime.gguf"
    shutil.copyfile(model_files.main, configured)
    shutil.copyfile(model_files.main, runtime)
    server = start_server(config=f'[[models]]\nname = "c"\npath = "{configured}"\nn_ctx = 512\n', name="file-changed")
    r = server.post("/load_model", json={"model_name": "r", "model_path": str(runtime), "n_ctx": 512})
    assert r.status_code == 200, r.text
    loaded = {name: server.status_of(name)["sha256"] for name in ("c", "r")}
    shutil.copyfile(model_files.other, configured)  # another valid GGUF, same path
    shutil.copyfile(model_files.other, runtime)
    os.kill(worker_pid(server), signal.SIGKILL)

    def settled():
        states = {m["name"]: m["state"] for m in server.get("/status").json()["models"]}
        return states if all(states.get(n) == "failed" for n in ("c", "r")) else None

    wait_for(settled, BACK_TIMEOUT, what="both models refused by the new worker")
    for name in ("c", "r"):
        st = server.status_of(name)
        assert "sha256" in st["error"] and loaded[name] in st["error"], st
        assert st["sha256"] != hashlib.sha256(model_files.other.read_bytes()).hexdigest()  # never the new digest
    assert requests.get(server.url + "/readiness", timeout=5).status_code == 503
    r = server.post("/v1/completions", json={"model": "c", "prompt": "hi", "max_tokens": 2})
    assert r.status_code in (404, 503), r.text
    assert any("sha256" in e.get("msg", "") and e.get("level") in ("warning", "error") for e in master_logs(server))
    # The operator accepts the new file explicitly: load it again (it is a new pin).
    r = server.post("/load_model", json={"model_name": "r", "model_path": str(runtime), "n_ctx": 512})
    assert r.status_code == 200, r.text
    assert server.status_of("r")["sha256"] == hashlib.sha256(model_files.other.read_bytes()).hexdigest()
    server.stop()


def test_load_model_with_a_wrong_sha256_is_refused(rserver, model_files):
    r = rserver.post("/load_model", json={"model_name": "pinned", "model_path": str(model_files.main), "sha256": "0" * 64})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "sha256" and err["code"] == "digest_mismatch", err
    good = hashlib.sha256(model_files.main.read_bytes()).hexdigest()
    r = rserver.post("/load_model", json={"model_name": "pinned", "model_path": str(model_files.main), "sha256": good})
    assert r.status_code == 200, r.text
    assert rserver.post("/unload_model", json={"model_name": "pinned"}).status_code == 200
