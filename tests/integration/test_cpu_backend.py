"""Runtime CPU dispatch: llama.cpp's CPU backend is built once per x86 level and the best one this
CPU runs is loaded at startup; /status shows which; server.cpu_backend pins one."""

from __future__ import annotations

import pytest
from test_lifecycle import _assert_config_error, _run_cli

pytestmark = pytest.mark.integration


def _cpu_device(server) -> dict:
    r = server.get("/status")
    assert r.status_code == 200, r.text
    cpu = [d for d in r.json()["devices"] if d["type"] == "cpu"]
    assert len(cpu) == 1, r.text
    return cpu[0]


def test_status_names_the_cpu_build_picked_for_this_machine(server):
    dev = _cpu_device(server)
    assert dev["name"] == "CPU" and dev["description"]
    # A dispatched module (cpu-<level>), not a single baked-in build.
    assert dev["module"].startswith("cpu-") and len(dev["module"]) > 4, dev


def test_cpu_backend_pins_a_build_and_it_serves(start_server, model_files):
    server = start_server(models={"m": model_files.main}, config='[server]\ncpu_backend = "haswell"\n', name="haswell")
    try:
        assert _cpu_device(server)["module"] == "cpu-haswell"
        r = server.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    finally:
        server.stop()


def test_unknown_cpu_backend_is_a_config_error_naming_the_builds(tmp_path):
    done = _run_cli([], tmp_path, config='[server]\ncpu_backend = "pentium4"\n')
    _assert_config_error(done, "server.cpu_backend", "pentium4", "haswell")


def test_status_says_why_this_build_runs_and_what_its_probe_ran(server):
    dev = _cpu_device(server)
    assert dev["extra_buffers"] is True
    assert dev["reason"] == "the best build for this CPU; its probe passed"
    (probe,) = dev["probes"]
    assert probe["module"] == dev["module"] and probe["ok"] is True and probe["extra_buffers"] is True
    assert "14 weight types" in probe["detail"]


_SIMULATED = '[attestation]\nprovider = "simulated"\n'


def _claims(server) -> dict:
    r = server.get("/v1/attestation", params={"nonce": "ab" * 32})
    assert r.status_code == 200, r.text
    return r.json()["claims"]


def test_a_build_whose_probe_dies_is_not_used_and_everything_says_so(start_server, model_files, server):
    # The AMX failure's shape, injected: the best build's probe child dies with SIGILL when it uses
    # llama.cpp's extra (AMX / repacked) weight buffers. The server must serve on that build without
    # them, and say so in the log, /status and the attestation claims.
    best = _cpu_device(server)["module"]
    fallback = start_server(
        models={"m": model_files.main}, config=_SIMULATED, env={"APPLIANCE_FAULT_CPU_PROBE": best}, name="probe-fault"
    )
    try:
        dev = _cpu_device(fallback)
        assert dev["module"] == best and dev["extra_buffers"] is False, dev
        assert [(p["module"], p["extra_buffers"], p["ok"], p["detail"]) for p in dev["probes"]] == [
            (best, True, False, "killed by SIGILL"),
            (best, False, True, dev["probes"][1]["detail"]),
        ]
        assert dev["reason"].startswith(f"fallback: {best} was the best build for this CPU but its probe failed")
        assert "killed by SIGILL" in dev["reason"] and "without extra buffers (no AMX, no repacking)" in dev["reason"]
        warnings = [line for line in fallback.stderr().splitlines() if "llama.cpp CPU backend: fallback" in line]
        assert len(warnings) == 1 and "SIGILL" in warnings[0] and best in warnings[0], fallback.stderr()[-2000:]
        r = fallback.post("/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
        assert _claims(fallback)["backend"] == {"cpu": best, "extra_buffers": False, "fallback": True}
    finally:
        fallback.stop()


def test_claims_name_the_build_that_runs(start_server, model_files, server):
    s = start_server(models={"m": model_files.main}, config=_SIMULATED, name="claims-backend")
    try:
        assert _claims(s)["backend"] == {"cpu": _cpu_device(s)["module"], "extra_buffers": True, "fallback": False}
    finally:
        s.stop()
