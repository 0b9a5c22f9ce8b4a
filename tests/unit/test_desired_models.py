"""The master-owned shared state (appliance.desired): desired models, worker restarts, measurement log."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest

from appliance.desired import _HEADER, SharedState, StateFull
from appliance.settings import ModelSettings
from appliance.web.server import describe_exit


def ms(name: str, **kw) -> ModelSettings:
    return ModelSettings(name=name, path=Path(f"/models/{name}.gguf"), **kw)


def names(state: SharedState) -> list[str]:
    return [s.name for _, s in state.desired.settings()]


# ---------------------------------------------------------------------------------------------
# Desired models


def test_round_trip_keeps_every_setting():
    a = ms("a", n_ctx=256, parallel=2, seed=7, chat_template="{{ messages }}", flash_attn="off", n_threads=3)
    state = SharedState([a])
    b = ms("b", n_ctx=512, parallel=1, n_gpu_layers=-1, use_mmap=False, max_queue=0)
    state.desired.add(b)
    assert state.desired.settings() == [("config", a), ("runtime", b)]
    assert state.desired.names() == ["a", "b"]


def test_restore_order_configured_first_then_runtime_in_load_order():
    state = SharedState([ms("c1"), ms("c2")])
    state.desired.add(ms("r1"))
    state.desired.add(ms("r2"))
    # A configured model unloaded, then loaded at run time: it is now a runtime one, loaded last.
    assert state.desired.remove("c1")
    state.desired.add(ms("c1", n_ctx=128))
    assert [(o, s.name) for o, s in state.desired.settings()] == [
        ("config", "c2"), ("runtime", "r1"), ("runtime", "r2"), ("runtime", "c1"),
    ]
    assert state.desired.settings()[-1][1].n_ctx == 128


def test_unload_drops_and_unknown_is_false():
    state = SharedState([ms("a")])
    state.desired.add(ms("b"))
    assert state.desired.remove("a") is True
    assert state.desired.remove("a") is False
    assert state.desired.remove("nope") is False
    assert names(state) == ["b"]
    assert state.desired.remove("b") is True
    assert state.desired.settings() == [] and state.desired.names() == []


def test_add_replaces_a_same_named_entry():
    state = SharedState([ms("a", n_ctx=128)])  # say it failed to load, then was loaded again with other settings
    state.desired.add(ms("a", n_ctx=1024))
    assert [(o, s.n_ctx) for o, s in state.desired.settings()] == [("runtime", 1024)]


def test_capacity_limit_is_a_clear_error_and_changes_nothing():
    state = SharedState([ms("a")], models_bytes=1024)
    state.desired.add(ms("b"))
    before = state.desired.settings()
    big = ms("c", chat_template="x" * 2000)
    with pytest.raises(StateFull, match=r"the desired models would take \d+ bytes; the shared memory holds \d+"):
        state.desired.check_room(big)
    with pytest.raises(StateFull, match="the desired models would take"):
        state.desired.add(big)
    assert state.desired.settings() == before
    state.desired.check_room(ms("d"))  # a small one still fits


def test_a_forked_child_sees_the_parent_writes_and_the_parent_sees_the_child():
    """The property the server relies on: the mapping is shared with every process forked after it."""
    state = SharedState([ms("a")])
    pid = os.fork()
    if pid == 0:  # the "worker"
        try:
            ok = state.desired.names() == ["a"]
            state.desired.add(ms("b", parallel=3))
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [(s.name, s.parallel) for _, s in state.desired.settings()] == [("a", 4), ("b", 3)]


# ---------------------------------------------------------------------------------------------
# Torn writes


def _slots(state: SharedState):
    return state.desired._record._slots  # white box: the two buffers of the record


def test_torn_newest_slot_falls_back_to_the_last_good_record():
    state = SharedState([ms("a")])
    state.desired.add(ms("b"))
    good = state.desired.settings()
    state.desired.add(ms("c"))  # the newest record, in the other slot
    gens = [int.from_bytes(bytes(s[4:12]), "little") for s in _slots(state)]
    newest = _slots(state)[gens.index(max(gens))]
    # A write cut short: the payload half old, half new. The checksum no longer matches.
    newest[_HEADER.size + 10] ^= 0xFF
    assert state.desired.settings() == good
    # The next write goes over the torn slot, never over the good one.
    state.desired.add(ms("d"))
    assert names(state) == ["a", "b", "d"]


def test_torn_header_and_absurd_length_fall_back():
    state = SharedState([ms("a")])
    state.desired.add(ms("b"))
    good = state.desired.settings()
    state.desired.add(ms("c"))
    gens = [int.from_bytes(bytes(s[4:12]), "little") for s in _slots(state)]
    newest = _slots(state)[gens.index(max(gens))]
    newest[12:16] = (10**9).to_bytes(4, "little")  # length beyond the slot
    assert state.desired.settings() == good
    newest[0:4] = b"\0\0\0\0"  # magic gone
    assert state.desired.settings() == good


def test_both_slots_spoiled_reads_as_empty_never_garbage():
    state = SharedState([ms("a")])
    state.desired.add(ms("b"))
    for s in _slots(state):
        s[_HEADER.size] ^= 0xFF
    assert state.desired.settings() == [] and state.desired.names() == []


def test_writer_killed_at_random_moments_never_corrupts_the_set():
    """A child adds and removes models as fast as it can and is SIGKILLed mid-way, many times: every read
    afterwards is a complete record the child wrote whole. Each round leaves at most its one model behind
    (killed between its add and its remove)."""
    big = "t" * 400_000  # long writes, so that some kills land inside one
    state = SharedState([ms("c0")])
    expected = ["c0"]
    torn_seen = 0
    rng = random.Random(1)
    for round_ in range(30):
        pid = os.fork()
        if pid == 0:
            try:
                i = 0
                while True:
                    state.desired.add(ms(f"r{round_}-{i}", chat_template=big if i % 2 else None))
                    state.desired.remove(f"r{round_}-{i}")
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        torn_seen += sum(state.desired._record._slot(i) is None for i in (0, 1))
        got = state.desired.names()
        assert got[: len(expected)] == expected and len(got) <= len(expected) + 1, (got, expected)
        if len(got) > len(expected):
            assert got[-1].startswith(f"r{round_}-"), got
        state.desired.settings()  # parses and validates every entry
        expected = got
    print(f"kills that left a torn slot: {torn_seen} of 30")


# ---------------------------------------------------------------------------------------------
# Worker deaths and the measurement log


def test_worker_deaths_count_by_cause():
    state = SharedState()
    assert state.deaths.read() == {"restarts": 0, "causes": {}, "last": None}
    state.deaths.record(pid=10, cause="SIGKILL", detail="killed by SIGKILL", wall=1.0, monotonic=2.0)
    state.deaths.record(pid=11, cause="SIGSEGV", detail="killed by SIGSEGV", wall=3.0, monotonic=4.0)
    d = state.deaths.record(pid=12, cause="SIGKILL", detail="killed by SIGKILL", wall=5.0, monotonic=6.0)
    assert d["restarts"] == 3 and d["causes"] == {"SIGKILL": 2, "SIGSEGV": 1}
    assert state.deaths.read()["last"] == {"pid": 12, "cause": "SIGKILL", "detail": "killed by SIGKILL", "at": 5.0, "monotonic": 6.0}


def test_measurement_log_survives_and_is_bounded():
    state = SharedState(measurements_bytes=2048)
    events = [{"register": "rtmr3", "digest": "ab" * 48, "event": {"name": "m"}, "extended": True}]
    state.measurements.replace(lambda: list(events))
    assert state.measurements.events() == events
    with pytest.raises(StateFull, match="the runtime measurement log"):
        state.measurements.replace(lambda: events * 20)
    assert state.measurements.events() == events


def test_records_are_json_and_independent():
    state = SharedState([ms("a")])
    state.deaths.record(pid=1, cause="exit_1", detail="exited with code 1", wall=0.0, monotonic=0.0)
    assert state.desired.names() == ["a"]
    raw = bytes(_slots(state)[0][_HEADER.size:]).rstrip(b"\0")
    assert json.loads(raw)["models"][0]["settings"]["path"] == "/models/a.gguf"


@pytest.mark.parametrize(
    "code,sig,dumped,cause,needle",
    [
        (None, signal.SIGKILL, False, "SIGKILL", "killed by SIGKILL (perhaps the OOM killer)"),
        (None, signal.SIGILL, True, "SIGILL", "illegal instruction"),
        (None, signal.SIGSEGV, True, "SIGSEGV", "core dumped"),
        (3, None, False, "exit_3", "exited with code 3"),
        (0, None, False, "exit_0", "exited with code 0"),
        (None, None, False, "unknown", "not seen"),
    ],
)
def test_describe_exit_names_the_signal_or_code(code, sig, dumped, cause, needle):
    got_cause, sentence = describe_exit(code, sig, dumped)
    assert got_cause == cause and needle in sentence


# ---------------------------------------------------------------------------------------------
# The app's side (in-process, the contract tier's fake registry): readiness, load, unload, metrics


@pytest.fixture
def app_parts(tmp_path):
    import falcon.testing

    from appliance.settings import Settings
    from appliance.web.app import create_app
    from tests.conftest import FakeRegistry

    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    settings = Settings.model_validate({"models": [{"name": "tiny", "path": str(gguf)}, {"name": "cfg2", "path": str(gguf)}]})
    shared = SharedState(settings.models)
    registry = FakeRegistry()
    app, state = create_app(settings, models=registry, shared=shared)
    return falcon.testing.TestClient(app), registry, shared, gguf


def test_readiness_waits_for_every_desired_model(app_parts):
    client, registry, shared, _ = app_parts
    r = client.simulate_get("/readiness")
    assert r.status_code == 503 and r.json["error"]["code"] == "not_ready" and r.headers["Retry-After"] == "1"
    assert "Waiting for 2 model(s): tiny, cfg2" in r.json["error"]["message"]
    registry.add("tiny")  # one model ready is not enough any more
    r = client.simulate_get("/readiness")
    assert r.status_code == 503 and "Waiting for 1 model(s): cfg2" in r.json["error"]["message"]
    registry.add("cfg2", state="loading")
    assert client.simulate_get("/readiness").status_code == 503
    registry.add("cfg2")
    r = client.simulate_get("/readiness")
    assert r.status_code == 200 and r.json == {"status": "ready", "models": ["tiny", "cfg2"]}
    registry.engine("cfg2").healthy = False
    assert client.simulate_get("/readiness").status_code == 503


def test_load_and_unload_change_the_desired_set(app_parts):
    client, registry, shared, gguf = app_parts
    registry.add("tiny"), registry.add("cfg2")
    r = client.simulate_post("/load_model", json={"model_name": "late", "model_path": str(gguf), "n_ctx": 128, "parallel": 3})
    assert r.status_code == 200, r.text
    late = shared.desired.settings()[-1]
    assert late[0] == "runtime" and (late[1].name, late[1].n_ctx, late[1].parallel, late[1].path) == ("late", 128, 3, gguf)
    # A failed load is not desired.
    r = client.simulate_post("/load_model", json={"model_name": "gone", "model_path": str(gguf.parent / "none.gguf")})
    assert r.status_code == 400 and "gone" not in shared.desired.names()
    r = client.simulate_post("/unload_model", json={"model_name": "tiny"})
    assert r.status_code == 200
    assert shared.desired.names() == ["cfg2", "late"]
    assert client.simulate_get("/readiness").status_code == 200


def test_unloading_a_desired_model_that_failed_stops_readiness_waiting_for_it(app_parts):
    client, registry, shared, _ = app_parts
    registry.add("tiny"), registry.add("cfg2", state="failed")  # e.g. its file vanished before a restart
    assert client.simulate_get("/readiness").status_code == 503
    r = client.simulate_post("/unload_model", json={"model_name": "cfg2"})
    assert r.status_code == 200 and r.json == {"status": "unloaded", "model": {"name": "cfg2"}}
    assert shared.desired.names() == ["tiny"]
    assert client.simulate_get("/readiness").status_code == 200
    # Neither loaded nor desired: still 404.
    assert client.simulate_post("/unload_model", json={"model_name": "cfg2"}).status_code == 404


def test_load_refused_when_the_desired_set_is_full(tmp_path):
    import falcon.testing

    from appliance.settings import Settings
    from appliance.web.app import create_app
    from tests.conftest import FakeRegistry

    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    settings = Settings.model_validate({})
    shared = SharedState(models_bytes=600)  # room for one model entry (~320 bytes), not two
    registry = FakeRegistry()
    client = falcon.testing.TestClient(create_app(settings, models=registry, shared=shared)[0])
    assert client.simulate_post("/load_model", json={"model_name": "a", "model_path": str(gguf)}).status_code == 200
    r = client.simulate_post("/load_model", json={"model_name": "b", "model_path": str(gguf)})
    assert r.status_code == 409 and r.json["error"]["param"] == "model_name", r.text
    assert "too many models to keep across a worker restart" in r.json["error"]["message"]
    assert [rec.name for rec in registry.records()] == ["a"]  # refused before loading
    assert shared.desired.names() == ["a"]


def test_metrics_export_the_restarts_the_master_counted(app_parts):
    client, _, shared, _ = app_parts
    text = client.simulate_get("/metrics").text
    assert "appliance_worker_restarts_total 0.0" in text
    shared.deaths.record(pid=5, cause="SIGILL", detail="killed by SIGILL", wall=0.0, monotonic=0.0)
    text = client.simulate_get("/metrics").text
    assert "appliance_worker_restarts_total 1.0" in text
    assert 'appliance_worker_restarts_by_cause_total{cause="SIGILL"} 1.0' in text


def test_cpu_backends_remember_a_build_that_killed_a_worker():
    from appliance.desired import SharedState

    state = SharedState()
    assert state.backends.refused() == {} and state.backends.refuse_in_use("x") is None  # nothing in use yet
    state.backends.in_use("cpu-sapphirerapids", True)
    assert state.backends.refuse_in_use("killed a worker with SIGILL") == {"module": "cpu-sapphirerapids", "extra_buffers": True}
    state.backends.in_use("cpu-sapphirerapids", False)  # the next worker's choice
    assert state.backends.refused() == {("cpu-sapphirerapids", True): "killed a worker with SIGILL"}
    state.backends.refuse_in_use("killed a worker with SIGILL")
    assert set(state.backends.refused()) == {("cpu-sapphirerapids", True), ("cpu-sapphirerapids", False)}
