"""The CPU backend probe: children that die, hang or compute garbage never take the caller down,
and the choice falls back in a fixed order, saying why."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from appliance.engine import cpuprobe
from appliance.engine.cpuprobe import ProbeResult, choose_backend, probe_module, rank_modules, run_in_child
from appliance.settings import cpu_backends


def _lib_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0]) / "lib"


# -- run_in_child ------------------------------------------------------------------------------


def _answer(x: int) -> dict:
    return {"twice": 2 * x}


def _die(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(5)


def _exit(code: int) -> None:
    os._exit(code)


def _hang() -> None:
    time.sleep(30)


def test_child_result_comes_back():
    assert run_in_child(_answer, 21, timeout=10) == ("ok", {"twice": 42})


@pytest.mark.parametrize("sig", [signal.SIGILL, signal.SIGSEGV, signal.SIGKILL, signal.SIGBUS])
def test_child_killed_by_a_signal_is_named(sig):
    status, payload = run_in_child(_die, int(sig), timeout=10)
    assert status == f"killed by {sig.name}"
    assert payload is None


def test_child_exit_code_is_reported():
    assert run_in_child(_exit, 3, timeout=10) == ("exited with 3", None)


def test_child_exception_is_an_exit_not_a_return_into_the_caller():
    def boom():
        raise ValueError("no")

    assert run_in_child(boom, timeout=10) == ("exited with 70", None)


def test_hung_child_is_killed_at_the_deadline():
    t0 = time.monotonic()
    status, _ = run_in_child(_hang, timeout=0.5)
    assert status == "timed out after 0.5 s"
    assert time.monotonic() - t0 < 5


# -- choose_backend: the fallback order --------------------------------------------------------


RANKED = [("cpu-sapphirerapids", 900), ("cpu-zen4", 800), ("cpu-icelake", 700), ("cpu-haswell", 300)]


def _probe_dying_on(dying: dict[tuple[str, bool], int]):
    """A probe whose real forked child kills itself with the given signal for (module, extra_buffers)."""
    calls: list[tuple[str, bool]] = []

    def probe(lib_dir: Path, tag: str, extra: bool, n_threads: int) -> ProbeResult:
        calls.append((tag, extra))
        sig = dying.get((tag, extra))
        status, _ = run_in_child(_die, sig, timeout=10) if sig else run_in_child(_answer, 1, timeout=10)
        return ProbeResult(tag, extra, status == "ok", "passed" if status == "ok" else status, 0.0)

    return probe, calls


def test_best_module_passing_is_chosen_with_its_extra_buffers():
    probe, calls = _probe_dying_on({})
    choice = choose_backend(Path("/nonexistent"), probe=probe, rank=lambda _: RANKED)
    assert (choice.module, choice.extra_buffers, choice.fell_back) == ("cpu-sapphirerapids", True, False)
    assert calls == [("cpu-sapphirerapids", True)]
    assert choice.reason == "the best build for this CPU; its probe passed"


def test_module_whose_probe_dies_falls_back_to_the_same_build_without_extra_buffers():
    # The AMX case: the sapphirerapids build dies with SIGILL in its AMX buffers; its AVX-512 kernels run.
    probe, calls = _probe_dying_on({("cpu-sapphirerapids", True): signal.SIGILL})
    choice = choose_backend(Path("/nonexistent"), probe=probe, rank=lambda _: RANKED)
    assert calls == [("cpu-sapphirerapids", True), ("cpu-sapphirerapids", False)]
    assert (choice.module, choice.extra_buffers, choice.fell_back) == ("cpu-sapphirerapids", False, True)
    assert "SIGILL" in choice.reason and "cpu-sapphirerapids" in choice.reason
    assert "without extra buffers (no AMX, no repacking)" in choice.reason
    assert [p.ok for p in choice.probes] == [False, True]
    assert choice.to_dict()["probes"][0]["detail"] == "killed by SIGILL"


def test_module_that_dies_either_way_falls_back_to_the_next_build():
    probe, calls = _probe_dying_on(
        {("cpu-sapphirerapids", True): signal.SIGILL, ("cpu-sapphirerapids", False): signal.SIGSEGV}
    )
    choice = choose_backend(Path("/nonexistent"), probe=probe, rank=lambda _: RANKED)
    assert calls == [("cpu-sapphirerapids", True), ("cpu-sapphirerapids", False), ("cpu-zen4", True)]
    assert (choice.module, choice.extra_buffers) == ("cpu-zen4", True)
    assert "SIGILL" in choice.reason and "SIGSEGV" in choice.reason


def test_a_build_that_killed_a_worker_while_serving_is_not_tried_again():
    probe, calls = _probe_dying_on({})
    refused = {("cpu-sapphirerapids", True): "killed a worker with SIGILL"}
    choice = choose_backend(Path("/nonexistent"), probe=probe, rank=lambda _: RANKED, refused=refused)
    assert calls == [("cpu-sapphirerapids", False)]
    assert (choice.module, choice.extra_buffers, choice.fell_back) == ("cpu-sapphirerapids", False, True)
    assert choice.probes[0].detail == "not tried: it killed a worker with SIGILL while serving"


def test_pinned_build_is_tried_first_and_falls_back_like_auto():
    probe, calls = _probe_dying_on({("cpu-icelake", True): signal.SIGILL, ("cpu-icelake", False): signal.SIGILL})
    choice = choose_backend(Path("/nonexistent"), "icelake", probe=probe, rank=lambda _: RANKED)
    assert calls[:3] == [("cpu-icelake", True), ("cpu-icelake", False), ("cpu-sapphirerapids", True)]
    assert choice.module == "cpu-sapphirerapids"
    assert "pinned build" in choice.reason


def test_pinned_build_this_cpu_cannot_run_is_refused():
    probe, _ = _probe_dying_on({})
    with pytest.raises(RuntimeError, match="this CPU cannot run llama.cpp's cpu-avx512x build"):
        choose_backend(Path("/nonexistent"), "avx512x", probe=probe, rank=lambda _: RANKED)


def test_nothing_passes_raises_with_every_failure():
    dying = {(tag, extra): signal.SIGILL for tag, _ in RANKED for extra in (True, False)}
    probe, calls = _probe_dying_on(dying)
    with pytest.raises(RuntimeError, match="no CPU backend build of llama.cpp passed its probe") as e:
        choose_backend(Path("/nonexistent"), probe=probe, rank=lambda _: RANKED)
    assert len(calls) == 8
    assert str(e.value).count("killed by SIGILL") == 8


def test_no_build_fits_this_cpu():
    with pytest.raises(RuntimeError, match="fits this CPU"):
        choose_backend(Path("/nonexistent"), probe=_probe_dying_on({})[0], rank=lambda _: [])


# -- the real probe, on this machine's CPU -----------------------------------------------------

needs_modules = pytest.mark.skipif(not cpu_backends(), reason="this llama-cpp-python build has no CPU backend modules")


@needs_modules
def test_ranking_lists_runnable_builds_best_first():
    ranked = rank_modules(_lib_dir())
    assert ranked, "no CPU build fits this CPU"
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert {tag for tag, _ in ranked} <= {f"cpu-{b}" for b in cpu_backends()}
    assert "cpu-x64" in {tag for tag, _ in ranked}  # the baseline runs everywhere


@needs_modules
def test_real_probe_passes_on_the_best_build_and_on_the_baseline():
    best = rank_modules(_lib_dir())[0][0]
    for tag in (best, "cpu-x64"):
        result = probe_module(_lib_dir(), tag, True, 2)
        assert result.ok, result
        assert "14 weight types" in result.detail


@needs_modules
def test_real_probe_catches_wrong_results(monkeypatch):
    # No kernel here computes garbage, so demand the impossible: the comparison itself must fail the probe.
    monkeypatch.setattr(cpuprobe, "_MIN_COSINE", 1.5)
    result = probe_module(_lib_dir(), "cpu-x64", False, 1)
    assert not result.ok
    assert result.detail.startswith("wrong result: f16 x 1 rows through plain")


@needs_modules
def test_real_probe_of_a_missing_module_fails_cleanly():
    result = probe_module(_lib_dir(), "cpu-nonexistent", True, 1)
    assert not result.ok
    assert result.detail == "the module did not load"
