"""The quantization battery: the real model (Gemma 3 270M) in 7 types, all loaded in one server, each
answering a short and a ~300-token prompt greedily, on the CPU build picked for this machine; then the
same 7 loaded again on every CPU build this machine can run (one server per build).

What is asserted about the text, honestly: it is non-empty, decodes cleanly (no U+FFFD) and holds real
words; the short prompt's answer continues the sentence (" the capital of ...": every type does on the
builds tried, though Q4_0 and IQ4_NL requantized from Q4_K_M go on to name the wrong capital); the long
prompt's continuation stays on its topic (Paris). Not asserted: any type's exact text, or that the types
agree with each other (requantizing changes the weights), or that builds agree (their kernels round
differently). Exact text against llama.cpp's own is test_real_model's job.

Per build, to keep CI on 2 cores in minutes: all 7 types answer the short prompt (4 tokens), and one
type (Q8_0, the fastest on the scalar x64 build) answers the long one.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from appliance_it import Server

from appliance.settings import cpu_backends

pytestmark = pytest.mark.integration

TYPES = ("Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "IQ4_NL", "F16")
SHORT = "The capital of France is"
LONG = (
    "Paris is the capital and largest city of France. It is situated on the river Seine, in the north of the "
    "country, at the heart of the Ile-de-France region. The city has been one of the major centres of finance, "
    "diplomacy, commerce, culture, fashion and gastronomy for centuries. For its leading role in the arts and "
    "sciences and its early and extensive system of street lighting, in the nineteenth century it became known "
    "as the City of Light.\n\n"
    "The history of Paris goes back more than two thousand years. A Celtic people known as the Parisii settled "
    "on an island in the Seine around the third century before the common era. The Romans conquered the area in "
    "52 BC and built a town called Lutetia on the left bank of the river, with a forum, baths, temples and an "
    "amphitheatre. In the following centuries the town grew slowly, and by the end of the Roman period it had "
    "taken the name of its first inhabitants.\n\n"
    "In the Middle Ages Paris became the largest city in Europe and an important religious and academic centre. "
    "The cathedral of Notre-Dame was begun in 1163, and the University of Paris, founded around 1150, attracted "
    "students from across the continent. Later kings built the Louvre as a fortress and then as a palace, and "
    "the city spread far beyond its old walls.\n\n"
    "Today Paris is famous for its museums, its monuments and its cafes. Visitors come from all over the world "
    "to see"
)
LONG_TOKENS = (280, 330)  # Gemma's tokenizer: 301 with BOS
ON_TOPIC = ("paris", "france", "french", "louvre", "eiffel", "triomphe", "notre", "seine", "museum", "musée", "musee",
            "monument", "cathedral", "palace", "tower", "art")
PER_BUILD_LONG = "Q8_0"


def battery_config(models: dict[str, Path], cpu_backend: str = "auto") -> str:
    # One slot, a modest context: 7 models at once stay small, and the long prompt still fits.
    lines = [f'[server]\ncpu_backend = "{cpu_backend}"\n', "[model_defaults]\nn_ctx = 512\nparallel = 1\n"]
    lines += [f'[[models]]\nname = "{name}"\npath = "{path}"\n' for name, path in sorted(models.items())]
    return "\n".join(lines)


def greedy(server: Server, model: str, prompt: str, n: int) -> dict:
    r = server.post("/v1/completions", timeout=300,
                    json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, f"{model}: {r.status_code} {r.text[:500]}"
    body = r.json()
    assert body["usage"]["completion_tokens"] >= 1, (model, body)
    return body


def assert_real_words(model: str, text: str, at_least: int) -> None:
    assert text.strip(), f"{model}: empty text {text!r}"
    assert "\ufffd" not in text, f"{model}: undecodable bytes in {text!r}"
    words = re.findall(r"[^\W\d_]{2,}", text)
    assert len(words) >= at_least, f"{model}: fewer than {at_least} words in {text!r}"


def assert_answers(server: Server, model: str, *, short_n: int, long_n: int | None) -> dict[str, str]:
    said = {}
    short = greedy(server, model, SHORT, short_n)["choices"][0]["text"]
    assert_real_words(model, short, at_least=2)
    assert short.startswith(" the capital"), f"{model}: {short!r}"
    said["short"] = short
    if long_n:
        body = greedy(server, model, LONG, long_n)
        lo, hi = LONG_TOKENS
        assert lo <= body["usage"]["prompt_tokens"] <= hi, body["usage"]
        text = body["choices"][0]["text"]
        assert_real_words(model, text, at_least=4)
        assert any(w in text.lower() for w in ON_TOPIC), f"{model}: off topic after the Paris passage: {text!r}"
        said["long"] = text
    return said


def test_battery_has_every_type(battery_models):
    assert sorted(battery_models) == sorted(TYPES)
    for name, path in battery_models.items():
        with open(path, "rb") as f:
            assert f.read(4) == b"GGUF", name


def test_every_type_answers_on_the_automatic_cpu_build(start_server, battery_models, record_property):
    server = start_server(config=battery_config(battery_models), name="battery-auto", wait="readiness")
    try:
        status = server.get("/status").json()
        assert {m["name"]: m["state"] for m in status["models"]} == dict.fromkeys(TYPES, "ready"), status
        module = next(d["module"] for d in status["devices"] if d["type"] == "cpu")
        for model in TYPES:
            record_property(f"{module}/{model}", assert_answers(server, model, short_n=12, long_n=16))
    finally:
        server.stop()


def _settled(server: Server, timeout: float) -> dict:
    """/status once every model is ready or failed."""
    deadline = time.monotonic() + timeout
    while True:
        if server.proc.poll() is not None:
            raise AssertionError(f"server exited with {server.proc.returncode}\n{server.stderr()[-3000:]}")
        body = server.get("/status").json()
        states = {m["name"]: m["state"] for m in body["models"]}
        if all(s in ("ready", "failed") for s in states.values()):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"models still loading after {timeout:.0f}s: {states}\n{server.stderr()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.parametrize("build", cpu_backends())
def test_every_type_answers_on_each_cpu_build(start_server, battery_models, build, record_property):
    """Each x86 level's kernels, every type: a build this CPU cannot run is refused at load with a message
    (skipped here, naming it); one that runs must serve all 7 types."""
    server = start_server(config=battery_config(battery_models, build), name=f"battery-{build}", wait="health")
    try:
        status = _settled(server, timeout=240)
        failed = {m["name"]: m["error"] for m in status["models"] if m["state"] == "failed"}
        cannot = f"this CPU cannot run llama.cpp's cpu-{build} build"
        if failed and cannot in server.stderr():
            pytest.skip(cannot)
        assert not failed, f"models failed to load on cpu-{build}: {failed}"
        cpu = next(d for d in status["devices"] if d["type"] == "cpu")
        if cpu["module"] != f"cpu-{build}":  # the pinned build failed its probe: the server fell back
            pytest.skip(f"cpu-{build} failed its probe here: {cpu['reason']}")
        for model in TYPES:
            record_property(f"cpu-{build}/{model}",
                            assert_answers(server, model, short_n=4, long_n=16 if model == PER_BUILD_LONG else None))
    finally:
        server.stop()
