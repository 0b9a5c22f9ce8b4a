"""The scheduler with real llama.cpp and a generated model, in-process (no server, no sockets)."""

from pathlib import Path

import gevent
import pytest

from appliance.engine.errors import PromptTooLong, QueueFull
from appliance.engine.events import Delta, Done, Failed, GenerationRequest
from appliance.engine.llama import SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.engine.slots import PairCost
from appliance.settings import Settings


@pytest.fixture(scope="module")
def registry(model_path):
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", model_path, n_ctx=256, parallel=2, max_queue=2, n_threads=1))
    yield reg
    reg.stop_all()


@pytest.fixture
def engine(registry):
    return registry.get("tiny")


def request(engine, text="Hello, world!", n=16, seed=7, **kw):
    prompt = tuple(engine.model.tokenize(text))
    return GenerationRequest(prompt, n, SamplingParams(seed=seed), **kw)


def collect(gen):
    text, done = "", None
    for ev in gen.events():
        if isinstance(ev, Delta):
            text += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        else:
            done = ev
    return text, done


def wait_idle(engine, timeout: float = 5.0) -> None:
    """Poll until no slot is busy and nothing waits (the scheduler frees a slot at its next step)."""
    for _ in range(int(timeout / 0.02)):
        if engine.busy_slots == 0 and engine.queue_depth == 0:
            return
        gevent.sleep(0.02)


def test_generates_exact_token_count(engine):
    text, done = collect(engine.submit(request(engine, n=12)))
    assert text and done.finish_reason == "length"
    assert done.usage.completion_tokens == 12 and done.timings.predicted_n == 12


def test_same_seed_same_text_whatever_runs_beside_it(engine):
    alone, _ = collect(engine.submit(request(engine, seed=99, n=24)))
    jobs = [gevent.spawn(collect, engine.submit(request(engine, text=f"other {i}", seed=i, n=24))) for i in range(3)]
    mine = gevent.spawn(collect, engine.submit(request(engine, seed=99, n=24)))
    gevent.joinall([*jobs, mine], raise_error=True)
    assert mine.value[0] == alone
    assert collect(engine.submit(request(engine, seed=100, n=24)))[0] != alone


def test_prefix_of_previous_request_is_reused(engine):
    long = "The quick brown fox jumps over the lazy dog. " * 8
    collect(engine.submit(request(engine, text=long, n=4)))
    _, done = collect(engine.submit(request(engine, text=long + "And then?", n=4)))
    assert done.usage.cached_tokens >= len(engine.model.tokenize(long)) - 1
    assert done.timings.prompt_n == done.usage.prompt_tokens - done.usage.cached_tokens


def test_stop_string_truncates_and_finishes(engine):
    full, _ = collect(engine.submit(request(engine, seed=3, n=20)))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    text, done = collect(engine.submit(request(engine, seed=3, n=20, stop=(stop,))))
    assert done.finish_reason == "stop"
    assert text == full[: full.index(stop)]


def test_logprobs_are_log_probabilities(engine):
    gen = engine.submit(request(engine, n=4, logprobs=3))
    lps = [lp for ev in gen.events() if isinstance(ev, Delta) for lp in ev.logprobs]
    assert len(lps) == 4
    for lp in lps:
        assert lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]


def test_cancel_frees_the_slot(engine):
    gen = engine.submit(request(engine, n=200, ignore_eos=True))
    events = gen.events()
    next(events)
    gen.close()
    wait_idle(engine)
    assert engine.busy_slots == 0


def test_cancel_wakes_a_greenlet_waiting_for_its_first_event(engine):
    # Both slots busy, so the third request waits in the queue and its greenlet waits for events
    # that will not come; cancelling it from another greenlet must end that wait at once.
    busy = [engine.submit(request(engine, n=150, ignore_eos=True, seed=i)) for i in (1, 2)]
    waiting = engine.submit(request(engine, n=4))
    got: list = []
    job = gevent.spawn(lambda: got.extend(waiting.events()))
    gevent.sleep(0.05)
    assert not job.dead and not got
    waiting.cancel()
    job.join(timeout=2)
    assert job.dead and got == []
    for g in busy:
        g.close()
    wait_idle(engine)
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_a_non_streaming_request_is_woken_once_not_per_token(engine):
    # A client that wants the whole answer gets the same text, with one wake-up of its greenlet at
    # the end instead of one per token.
    wakes, texts = {}, {}
    for stream in (True, False):
        gen = engine.submit(request(engine, n=20, ignore_eos=True, stream=stream))
        calls: list[int] = []
        real = gen._wake
        gen._wake = lambda real=real, calls=calls: (calls.append(1), real())
        texts[stream], done = collect(gen)
        assert done.usage.completion_tokens == 20
        wakes[stream] = len(calls)
    assert texts[True] == texts[False]
    assert wakes[False] == 1 and wakes[True] >= 19, wakes


def _sink_run(engine, sink_verdicts, n=48, seed=5):
    """Stream with a sink answering `sink_verdicts` in turn (then True): [(path, thread, text, verdict)]
    in arrival order, and the Done."""
    import threading

    gen = engine.submit(request(engine, n=n, ignore_eos=True, seed=seed))
    order: list[tuple[str, int, str, object]] = []
    verdicts = iter(sink_verdicts)

    def sink(delta):
        verdict = next(verdicts, True)
        if isinstance(verdict, Exception):
            raise verdict  # not taken: the delta comes through events()
        order.append(("sink", threading.get_ident(), delta.text, verdict))
        return verdict

    done = None
    for ev in gen.events(sink):
        if isinstance(ev, Delta):
            order.append(("events", threading.get_ident(), ev.text, None))
        elif isinstance(ev, Done):
            done = ev
    return order, done


def _reference(engine, n=48, seed=5) -> str:
    return collect(engine.submit(request(engine, n=n, ignore_eos=True, seed=seed)))[0]


def test_a_sink_takes_streamed_deltas_on_the_scheduler_thread_in_order(engine):
    import threading

    order, done = _sink_run(engine, [])
    assert done is not None and done.usage.completion_tokens == 48
    assert "".join(t for _, _, t, _ in order) == _reference(engine)
    # Offered at the first wait, before any token exists: every delta went to the sink, none to this greenlet.
    assert [p for p, _, _, _ in order] == ["sink"] * len(order) and len(order) >= 40
    assert threading.get_ident() not in {th for _, th, _, _ in order}


def test_a_sink_that_declines_hands_back_the_next_deltas_and_is_offered_again(engine):
    order, done = _sink_run(engine, [False, True, True, False])
    assert done is not None
    assert "".join(t for _, _, t, _ in order) == _reference(engine)  # nothing lost, nothing reordered
    paths = [p for p, _, _, _ in order]
    assert paths[0] == "sink"
    declined = [i for i, (_, _, _, v) in enumerate(order) if v is False]
    assert len(declined) == 2, paths
    for i in declined:  # the sink took the delta it declined after; the next one came through events()
        assert paths[i + 1] == "events", paths
    assert paths.count("sink") >= 5, paths  # offered again after each hand-back


def test_a_sink_that_raises_leaves_the_delta_to_the_greenlet(engine, caplog):
    order, done = _sink_run(engine, [True, RuntimeError("bug")])
    assert done is not None
    assert "".join(t for _, _, t, _ in order) == _reference(engine)
    paths = [p for p, _, _, _ in order]
    assert paths[:2] == ["sink", "events"] and "sink" in paths[2:], paths
    assert "direct writer failed" in caplog.text


def test_no_sink_call_after_the_generation_is_closed(engine):
    gen = engine.submit(request(engine, n=200, ignore_eos=True))
    calls: list[int] = []
    closed: list[bool] = []

    def sink(delta):
        calls.append(1)
        assert not closed, "sink called after close()"
        return True

    events = gen.events(sink)
    job = gevent.spawn(lambda: list(events))
    for _ in range(200):
        if len(calls) >= 3:
            break
        gevent.sleep(0.01)
    gen.close()
    closed.append(True)
    n = len(calls)
    gevent.sleep(0.2)  # several decode steps
    assert len(calls) == n >= 3
    job.kill()
    wait_idle(engine)
    assert engine.busy_slots == 0


class _Counts:
    def __init__(self) -> None:
        self.generated: list[int] = []
        self.prompt: list[int] = []
        self.finished: list = []

    def request_finished(self, model, finished) -> None:
        self.finished.append(finished)

    def first_token(self, model, seconds) -> None:
        pass

    def tokens_generated(self, model, n) -> None:
        self.generated.append(n)

    def prompt_tokens(self, model, n) -> None:
        self.prompt.append(n)


@pytest.mark.parametrize("tick", [0.0, 0.1])
def test_token_counts_reach_the_observer_in_batches_and_completely_by_the_end(model_path, tick):
    # The scheduler reports token counts at most every 0.5 s (by its clock) and whenever a request
    # ends, so that a scrape after a response always sees its tokens. With a frozen clock: one report
    # per request; with a clock moving 0.1 s per reading: several during a request.
    from appliance.engine.llama import LlamaModel
    from appliance.engine.scheduler import ModelEngine

    now = [1000.0]

    def clock() -> float:
        now[0] += tick
        return now[0]

    engine = ModelEngine("m", LlamaModel(model_path), n_ctx=256, parallel=1, n_batch=64, n_threads=1,
                         n_threads_batch=1, max_queue=1, clock=clock)
    counts = _Counts()
    engine._observer = counts
    engine.start()
    try:
        for n in (30, 7):
            req = request(engine, n=n, ignore_eos=True)
            before = sum(counts.generated), sum(counts.prompt)
            gen = engine.submit(req)
            for ev in gen.events():
                if isinstance(ev, Done):  # all counted by the time the client hears the end
                    assert sum(counts.generated) - before[0] == n
                    assert sum(counts.prompt) - before[1] == len(req.prompt) - ev.usage.cached_tokens
                    # and the request's times and prompt, once
                    f = counts.finished[-1]
                    assert (f.prompt, f.cached) == (len(req.prompt), ev.usage.cached_tokens)
                    assert 0 <= f.queued <= f.e2e and f.itl is not None and 0 <= f.itl * (n - 1) <= f.e2e
                    if tick:
                        assert f.itl > 0 and f.e2e > f.queued
        assert len(counts.finished) == 2
        if tick:
            assert len(counts.generated) > 2, counts.generated
        else:
            assert counts.generated == [30, 7]
    finally:
        engine.stop()


def test_prompt_longer_than_context_is_refused(engine):
    with pytest.raises(PromptTooLong):
        engine.submit(request(engine, text="word " * 400))


def test_context_cap_ends_generation_with_length(engine):
    req = request(engine, n=1000, n_ctx=20)
    text, done = collect(engine.submit(req))
    assert done.finish_reason == "length"
    assert done.usage.prompt_tokens + done.usage.completion_tokens <= 20


def test_full_queue_is_refused_with_retry_after(engine):
    gens = []
    with pytest.raises(QueueFull) as e:
        for _ in range(10):  # 2 slots + a queue of 2
            gens.append(engine.submit(request(engine, n=50)))
    assert e.value.retry_after > 0
    assert len(gens) == 4
    for g in gens:
        collect(g)


def test_runtime_cpu_dispatch_picked_a_cpu_build_this_machine_runs(registry):
    """ggml's CPU backend exists once per x86 level; the loaded one must be a module this CPU supports."""
    from appliance.engine.llama import _lib_dir, backend_devices

    variants = sorted(p.name for p in _lib_dir().glob("libggml-cpu-*.so"))
    assert len(variants) > 1, f"llama-cpp-python was not built with runtime CPU dispatch: {variants}"
    cpu = [d for d in backend_devices() if d["type"] == "cpu"]
    assert len(cpu) == 1, backend_devices()
    module_file = f"libggml-{cpu[0]['module']}.so"
    assert module_file in variants
    assert registry.devices() == backend_devices()
    # The pick is the best fit: no listed module that this CPU can run scores above it. Check the
    # flags the chosen module needs against /proc/cpuinfo for the common levels.
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    needs = {"haswell": {"avx2", "fma", "f16c", "bmi2"}, "skylakex": {"avx512f"}, "icelake": {"avx512_vnni", "avx512vbmi"},
             "zen4": {"avx512_bf16", "avx512_vnni"}, "sapphirerapids": {"amx_int8", "amx_tile"}}
    tag = cpu[0]["module"].removeprefix("cpu-")
    assert needs.get(tag, set()) <= flags, f"{tag} needs {needs[tag] - flags}"
    if {"avx2", "fma", "f16c", "bmi2"} <= flags:
        assert tag not in ("x64", "sse42", "sandybridge", "ivybridge", "piledriver"), f"AVX2 CPU got {tag}"


def test_batch_add_one_fills_the_batch_like_add():
    from appliance.engine.llama import Batch

    a, b = Batch(8), Batch(8)
    a.add([11, 12, 13], 0, 1, False)
    b.add([11, 12, 13], 0, 1, False)
    assert a.add_one(42, 7, 3) == b.add([42], 7, 3, True) == 3
    assert a.add_one(43, 9, 0) == b.add([43], 9, 0, True) == 4
    for name in ("token", "pos", "seq", "logits", "n_seq_id"):
        assert getattr(a, name)[: a.n].tolist() == getattr(b, name)[: b.n].tolist(), name
    assert a.struct.n_tokens == b.struct.n_tokens == 5


def test_token_info_matches_llama_cpp_for_every_token(engine):
    import ctypes

    import llama_cpp.llama_cpp as C

    model = engine.model
    buf = ctypes.create_string_buffer(1024)
    for token in range(model.n_vocab):
        n = C.llama_token_to_piece(model.vocab, token, buf, len(buf), 0, False)
        piece, eog = model.token_info(token)
        assert (piece, eog) == (buf.raw[:n], bool(C.llama_vocab_is_eog(model.vocab, token))), token
        assert piece == model.piece(token) and eog == model.is_eog(token)
    assert model.token_info(model.eos)[1] and not model.token_info(model.tokenize("Hello", add_special=False)[0])[1]
    for bad in (-1, model.n_vocab):
        with pytest.raises(ValueError):
            model.token_info(bad)


def test_many_requests_in_and_out_of_the_slots_leave_the_engine_clean(engine):
    # Requests finishing, cancelled while queued and cancelled mid-generation, interleaved: afterwards
    # no slot is held and the next request is served normally.
    gens = [engine.submit(request(engine, text=f"turn {i}", seed=i, n=6)) for i in range(4)]
    gens[3].cancel()
    jobs = [gevent.spawn(collect, g) for g in gens[:3]]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    mid = engine.submit(request(engine, n=200))
    for _ev in mid.events():
        mid.cancel()
        break
    wait_idle(engine)
    assert engine.busy_slots == 0 and engine.queue_depth == 0 and not engine._active
    text, done = collect(engine.submit(request(engine, n=5)))
    assert done.usage.completion_tokens == 5


@pytest.fixture
def engine4(model_path):
    reg = ModelRegistry()
    reg.load(Settings().model_settings("four", model_path, n_ctx=256, parallel=4, max_queue=4, n_threads=1))
    yield reg.get("four")
    reg.stop_all()


def _record_stream_copies(engine) -> list[tuple[int, int]]:
    """The (source, destination) of every KV stream copy the engine makes from now on."""
    copies: list[tuple[int, int]] = []
    real_copy = engine._ctx.seq_cp
    engine._ctx.seq_cp = lambda src, dst: (copies.append((src, dst)), real_copy(src, dst))
    return copies


def test_pair_cost_splits_a_pair_step_only_where_two_passes_are_clearly_cheaper():
    pc = PairCost()
    pc.observe(1, 0.0103)
    assert not pc.split()  # no pair pass timed yet: time one first
    pc.observe(2, 0.0215)  # two 10.3 ms passes beat one 21.5 ms pass (this machine's CPU kernels)
    picks = [pc.split() for _ in range(64)]
    assert picks.count(False) == 2 and not picks[30] and not picks[62]  # every 32nd step probes the other way
    pc = PairCost()
    pc.observe(2, 0.012)
    assert not pc.split()  # no one-token pass timed yet
    pc.observe(1, 0.0103)  # one pass for two tokens costs little more than for one (a GPU): never split
    assert [pc.split() for _ in range(64)].count(True) == 2  # but probe
    pc = PairCost()
    pc.observe(1, 0.010)
    pc.observe(2, 0.0205)  # 2 x 10 ms is not clearly below 20.5 ms: keep one pass
    assert not any(pc.split() for _ in range(30))
    for _ in range(20):
        pc.observe(2, 0.0215)  # the average follows what is measured
    assert pc.split()


def test_a_pair_decoded_in_two_passes_gives_each_request_its_text_alone(engine):
    alone, _ = collect(engine.submit(request(engine, seed=99, n=24)))
    sizes: list[int] = []

    class Always(PairCost):
        def split(self) -> bool:
            return True

    real_decode, real_pairs = engine._ctx.decode, engine._pairs
    engine._pairs = Always()
    engine._ctx.decode = lambda b: (sizes.append(b.n), real_decode(b))[1]
    try:
        other = gevent.spawn(collect, engine.submit(request(engine, text="another prompt", seed=5, n=24)))
        mine = gevent.spawn(collect, engine.submit(request(engine, seed=99, n=24)))
        gevent.joinall([other, mine], timeout=120, raise_error=True)
    finally:
        engine._ctx.decode, engine._pairs = real_decode, real_pairs
    assert mine.value[0] == alone and len(other.value[0]) > 0
    assert sizes.count(1) >= 40, sizes  # ~22 steps with both generating, each as two one-token passes


def test_busy_slots_are_kept_contiguous_and_a_moved_sequence_decodes_alike(engine, engine4):
    # llama.cpp decodes a split cache's sequences in one pass only while their ids are consecutive.
    # On a fresh engine A, B and C start side by side in slots 0, 1 and 2; B finishes first, leaving
    # {0, 2}: the scheduler copies C's KV stream into slot 1 and carries on there. A's and C's texts
    # are the texts they give alone (computed on another engine).
    a, b, c = (dict(text="the long one", seed=1, n=40), dict(text="the short one", seed=2, n=3),
               dict(text="the moved one", seed=5, n=40))
    alone_a, _ = collect(engine.submit(request(engine, **a)))
    alone_c, _ = collect(engine.submit(request(engine, **c)))
    copies = _record_stream_copies(engine4)
    seen: list[list[int]] = []
    real_step = engine4._step

    def step():
        seen.append([s.seq for s in engine4._active])
        real_step()

    engine4._step = step
    gens = [engine4.submit(request(engine4, **kw)) for kw in (a, b, c)]
    jobs = [gevent.spawn(collect, g) for g in gens]
    gevent.joinall(jobs, timeout=120, raise_error=True)
    assert [0, 1, 2] in seen, seen
    assert copies == [(2, 1)], (copies, seen)
    assert all(ids == list(range(ids[0], ids[0] + len(ids))) for ids in seen if ids), seen
    assert jobs[0].value[0] == alone_a and jobs[2].value[0] == alone_c
    assert jobs[2].value[1].usage.completion_tokens == 40


def test_a_long_cached_prefix_is_copied_into_a_contiguous_slot(engine4):
    copies = _record_stream_copies(engine4)
    system = "You are a careful assistant. " * 12
    # Slot 0 ends up holding the long prompt's cache; slot 1's request then keeps slot 0 busy.
    first, _ = collect(engine4.submit(request(engine4, text=system + "First question?", n=4)))
    hold = engine4.submit(request(engine4, text="something else entirely", seed=3, n=60))
    it = hold.events()
    next(it)  # admitted and generating
    busy = [s.seq for s in engine4._active]
    text, done = collect(engine4.submit(request(engine4, text=system + "Second question?", n=4)))
    for _ in it:
        pass
    assert done.usage.cached_tokens >= 32  # the system prompt was not recomputed
    ids = sorted(busy)
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    if copies:  # the cached prefix sat outside the busy block: it was copied next to it
        assert all(dst in {ids[0] - 1, ids[-1] + 1} for _, dst in copies), (copies, busy)


def test_an_unrelated_prompt_leaves_a_cached_conversation_alone_but_reuses_its_bos(engine4):
    fillers = [gevent.spawn(collect, engine4.submit(request(engine4, text=f"filler {i}", n=2))) for i in range(4)]
    gevent.joinall(fillers, timeout=60, raise_error=True)  # every slot now holds some cached tokens
    system = "You are a careful assistant. " * 12
    collect(engine4.submit(request(engine4, text=system + "First question?", n=4)))
    _, other = collect(engine4.submit(request(engine4, text="something else entirely", seed=3, n=4)))
    # It shares only the BOS token with the conversation: it takes another slot, and still does not
    # decode the BOS that slot already holds (a prompt token less, ~2 ms on a small CPU prompt).
    assert other.usage.cached_tokens == (1 if engine4.model.add_bos else 0)
    _, second = collect(engine4.submit(request(engine4, text=system + "Second question?", n=4)))
    assert second.usage.cached_tokens >= len(engine4.model.tokenize(system)) - 1


@pytest.mark.parametrize("use_mmap", [True, False])
def test_use_mmap_decides_whether_the_file_stays_mapped(model_path, use_mmap, tmp_path):
    # llama.cpp renamed use_mmap to load_mode: the setting must reach it, not be a silent no-op.
    import shutil

    from appliance.engine.llama import LlamaModel

    path = Path(shutil.copy(model_path, tmp_path / "own.gguf"))  # a path no other test has mapped

    def mapped() -> bool:
        return str(path) in Path("/proc/self/maps").read_text()

    assert not mapped()
    m = LlamaModel(path, use_mmap=use_mmap)
    try:
        assert mapped() is use_mmap
    finally:
        m.close()
