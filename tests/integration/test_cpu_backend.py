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
