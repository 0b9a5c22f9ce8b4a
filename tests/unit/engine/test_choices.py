"""n choices of one request (the scheduler with real llama.cpp and a generated model), and the
fill-in-the-middle prompt layout."""

import gevent
import pytest

from appliance.engine.errors import InfillNotSupported, TooManyChoices
from appliance.engine.events import Delta, Done, Failed, GenerationRequest, Timings, Usage
from appliance.engine.llama import LlamaModel, SamplingParams
from appliance.engine.prompt import FimTokens, infill_layout, infill_tokens
from appliance.engine.scheduler import ModelEngine
from tools.modelgen import ModelSpec, write_model


class _Counts:
    def __init__(self) -> None:
        self.prompt: list[int] = []
        self.first: int = 0
        self.finished: int = 0

    def request_finished(self, model, finished) -> None:
        self.finished += 1

    def first_token(self, model, seconds) -> None:
        self.first += 1

    def tokens_generated(self, model, n) -> None:
        pass

    def prompt_tokens(self, model, n) -> None:
        self.prompt.append(n)


@pytest.fixture(scope="module")
def engine(model_path):
    engine = ModelEngine("m", LlamaModel(model_path), n_ctx=256, parallel=3, n_batch=64, n_threads=1,
                         n_threads_batch=1, max_queue=4)
    engine._observer = _Counts()
    engine.start()
    yield engine
    engine.stop()


def request(engine, text="Hello, world!", max_tokens=16, seed=7, temperature=0.8, **kw):
    prompt = tuple(engine.model.tokenize(text))
    return GenerationRequest(prompt, max_tokens, SamplingParams(seed=seed, temperature=temperature), **kw)


def collect(gen) -> tuple[dict[int, str], dict[int, Done]]:
    texts: dict[int, str] = {}
    dones: dict[int, Done] = {}
    for ev in gen.events():
        if isinstance(ev, Delta):
            assert ev.index not in dones  # nothing of a choice after its end
            texts[ev.index] = texts.get(ev.index, "") + ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        else:
            assert ev.index not in dones
            dones[ev.index] = ev
    return texts, dones


def wait_idle(engine, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if engine.busy_slots == 0 and engine.queue_depth == 0:
            return
        gevent.sleep(0.02)


def test_greedy_choices_are_identical_and_the_prompt_is_decoded_once(engine):
    counts: _Counts = engine._observer
    text = "A prompt that nobody sent before, decoded once for all its choices."
    before_prompt, before_first, before_finished = sum(counts.prompt), counts.first, counts.finished
    req = request(engine, text=text, max_tokens=12, temperature=0.0, n=3, ignore_eos=True)
    texts, dones = collect(engine.submit(req))
    assert sorted(dones) == [0, 1, 2] and len(set(texts.values())) == 1 and texts[0]
    assert sum(counts.prompt) - before_prompt == len(req.prompt) - dones[0].usage.cached_tokens
    assert counts.first - before_first == 1  # one first token: the prompt's decode
    assert counts.finished - before_finished == 1  # one request in the latency histograms, not three
    for d in dones.values():
        assert d.usage.prompt_tokens == len(req.prompt) and d.usage.completion_tokens == 12
        assert d.finish_reason == "length"
    total = Done.merged(list(dones.values()))
    assert total.usage.prompt_tokens == len(req.prompt) and total.usage.completion_tokens == 36
    assert total.timings.prompt_n == dones[0].timings.prompt_n and total.timings.predicted_n == 36
    wait_idle(engine)
    assert engine.busy_slots == 0


def test_choice_i_samples_with_seed_plus_i_and_is_reproducible(engine):
    alone = [collect(engine.submit(request(engine, seed=40 + i, max_tokens=20)))[0][0] for i in range(3)]
    texts, _ = collect(engine.submit(request(engine, seed=40, max_tokens=20, n=3)))
    assert [texts[i] for i in range(3)] == alone
    assert len(set(alone)) > 1
    again, _ = collect(engine.submit(request(engine, seed=40, max_tokens=20, n=3)))
    assert again == texts


def test_choices_with_stop_and_logprobs_end_each_on_their_own(engine):
    req = request(engine, seed=3, max_tokens=24, n=2, logprobs=2)
    gen = engine.submit(req)
    lps: dict[int, int] = {}
    dones = {}
    for ev in gen.events():
        if isinstance(ev, Delta):
            lps[ev.index] = lps.get(ev.index, 0) + len(ev.logprobs)
        elif isinstance(ev, Done):
            dones[ev.index] = ev
    assert sorted(dones) == [0, 1]
    assert all(lps[i] == dones[i].usage.completion_tokens for i in (0, 1))


def test_each_choice_has_its_own_grammar_state(engine):
    from appliance.engine.llama import Grammar

    grammar = Grammar(engine.model, 'root ::= ("yes" | "no") " " ("yes" | "no")')
    prompt = tuple(engine.model.tokenize("Answer:"))
    req = GenerationRequest(prompt, 16, SamplingParams(seed=9, temperature=1.5, grammar=grammar), n=3)
    texts, dones = collect(engine.submit(req))
    assert sorted(dones) == [0, 1, 2]
    for i in range(3):
        assert dones[i].finish_reason == "stop" and texts[i].split(" ") in (
            [a, b] for a in ("yes", "no") for b in ("yes", "no")
        ), texts


def test_more_choices_than_slots_are_refused_not_queued(engine):
    with pytest.raises(TooManyChoices):
        engine.submit(request(engine, n=4))
    with pytest.raises(TooManyChoices):
        engine.submit(request(engine, n=0))


def test_choices_are_admitted_together_once_enough_slots_are_free(engine):
    # Two slots busy: a request of three choices waits whole (never holding a slot while it waits),
    # then runs once they are free; nothing wedges.
    busy = [engine.submit(request(engine, seed=i, max_tokens=40, ignore_eos=True)) for i in (1, 2)]
    jobs = [gevent.spawn(collect, g) for g in busy]
    gevent.sleep(0.05)
    three = gevent.spawn(collect, engine.submit(request(engine, max_tokens=6, n=3, ignore_eos=True)))
    gevent.sleep(0.05)
    assert engine.busy_slots <= 2
    gevent.joinall([*jobs, three], timeout=120, raise_error=True)
    assert sorted(three.value[1]) == [0, 1, 2]
    wait_idle(engine)
    assert engine.busy_slots == 0 and engine.queue_depth == 0


def test_cancelling_a_request_frees_all_its_choices_slots(engine):
    gen = engine.submit(request(engine, max_tokens=200, n=3, ignore_eos=True))
    events = gen.events()
    next(events)
    gen.close()
    wait_idle(engine)
    assert engine.busy_slots == 0
    texts, dones = collect(engine.submit(request(engine, max_tokens=4, n=2)))  # and it serves on
    assert sorted(dones) == [0, 1]


def test_merged_counts_the_prompt_once():
    t = Timings(prompt_n=5, prompt_ms=10.0, predicted_n=3, predicted_ms=30.0, queued_ms=1.0)
    a = Done("stop", Usage(7, 3, 2), t, 1)
    b = Done("length", Usage(7, 4, 2), Timings(5, 10.0, 4, 40.0, 1.0), 0)
    m = Done.merged([a, b])
    assert (m.finish_reason, m.index) == ("length", 0)
    assert m.usage == Usage(7, 7, 2) and m.timings.predicted_n == 7 and m.timings.predicted_ms == 40.0
    assert Done.merged([a]) is a


# -- fill in the middle ------------------------------------------------------------------------------

FIM = FimTokens(pre=900, suf=901, mid=902)


def test_infill_layout_is_llama_servers():
    # [BOS] FIM_PRE prefix FIM_SUF suffix FIM_MID, as llama-server's /infill (non-SPM order).
    got = infill_layout(FIM, [1, 2, 3], [4, 5], bos=0, repo=[], file=[], n_batch=64, n_predict=16, n_ctx=256)
    assert got == [0, 900, 1, 2, 3, 901, 4, 5, 902]
    assert infill_layout(FIM, [1], [4], bos=None, repo=[], file=[], n_batch=64, n_predict=16, n_ctx=256) == [
        900, 1, 901, 4, 902
    ]


def test_infill_layout_has_the_repo_header_where_the_vocabulary_has_its_tokens():
    fim = FimTokens(pre=900, suf=901, mid=902, rep=903, sep=904)
    got = infill_layout(fim, [1], [4], bos=0, repo=[7, 8], file=[9], n_batch=64, n_predict=16, n_ctx=256)
    assert got == [903, 7, 8, 904, 9, 0, 900, 1, 901, 4, 902]
    # No room in the context beside a batch and twice the tokens to predict: no header.
    got = infill_layout(fim, [1], [4], bos=0, repo=[7, 8], file=[9], n_batch=64, n_predict=96, n_ctx=256)
    assert got == [0, 900, 1, 901, 4, 902]


def test_infill_layout_keeps_the_prefix_end_and_the_suffix_start():
    prefix, suffix = list(range(100, 200)), list(range(300, 400))
    got = infill_layout(FIM, prefix, suffix, bos=None, repo=[], file=[], n_batch=16, n_predict=4, n_ctx=256)
    # 3/4 of a batch of the prefix (its last 12), 1/4 of a batch less 2 of the suffix (its first 2).
    assert got == [900, *range(188, 200), 901, 300, 301, 902]


def test_a_model_without_fim_tokens_refuses_a_suffix(engine):
    assert engine.model.fim_tokens()[:3].count(-1) > 0
    with pytest.raises(InfillNotSupported):
        infill_tokens(engine.model, "def f(", "):", n_batch=64, n_predict=16, n_ctx=256)


@pytest.fixture(scope="module")
def fim_registry(tmp_path_factory):
    # The StarCoder vocabulary has FIM tokens (<fim_prefix>, <fim_suffix>, <fim_middle>; llama.cpp finds
    # them by their text), and no BOS rule.
    from appliance.engine.registry import ModelRegistry
    from appliance.settings import Settings

    try:
        path = write_model(tmp_path_factory.mktemp("fim") / "fim.gguf", ModelSpec(dtype="q8_0", vocab="ggml-vocab-starcoder.gguf"))
    except FileNotFoundError as e:
        pytest.fail(f"cannot build the test model: {e}")
    reg = ModelRegistry()
    reg.load(Settings().model_settings("fim", path, n_ctx=256, parallel=2, max_queue=2, n_threads=1))
    yield reg
    reg.stop_all()


def test_a_suffix_is_laid_out_with_the_models_fim_tokens_and_generates(fim_registry):
    engine, prompt = fim_registry.infill_prompt("fim", "def add(a, b):\n    return ", "\n\nprint(add(1, 2))", n_predict=8)
    model = engine.model
    pre, suf, mid, rep, sep = model.fim_tokens()
    assert min(pre, suf, mid) >= 0 and (rep, sep) == (-1, -1) and not model.add_bos
    tok = lambda s: model.tokenize(s, add_special=False, parse_special=False)  # noqa: E731
    assert prompt == [pre, *tok("def add(a, b):\n    return "), suf, *tok("\n\nprint(add(1, 2))"), mid]
    _, ids = fim_registry.infill_prompt("fim", [5, 6, 7], "x", n_predict=8)  # token ids as the prefix
    assert ids == [pre, 5, 6, 7, suf, *tok("x"), mid]
    texts, dones = collect(engine.submit(GenerationRequest(tuple(prompt), 6, SamplingParams(seed=1), n=2)))
    assert sorted(dones) == [0, 1] and all(d.usage.prompt_tokens == len(prompt) for d in dones.values())
