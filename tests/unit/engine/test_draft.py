"""Predicted Outputs (issue 18): following a prediction, the drafting decision, and the scheduler's
verification in real llama.cpp, which must never change what is generated."""

import numpy as np
import pytest

from appliance.engine.draft import DRAFT_CHOICES, Prediction, StepCosts, draft_length, expected_tokens
from appliance.engine.events import Delta, Failed, GenerationRequest
from appliance.engine.llama import SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from tools.modelgen import ModelSpec, write_model

# -- following the prediction ------------------------------------------------------------------


def test_the_answer_is_followed_through_the_prediction():
    p = Prediction([10, 11, 12, 13, 14])
    assert p.upcoming(3) == [10, 11, 12]
    assert p.observe(10) and p.observe(11)
    assert p.upcoming(10) == [12, 13, 14] and p.matched == 2


def test_after_an_edit_the_prediction_is_found_again_by_the_last_tokens():
    p = Prediction([1, 2, 3, 4, 5, 6, 7, 8, 9])
    for t in (1, 2, 3):
        assert p.observe(t)
    # the answer inserts 40, 41 then goes on with 4, 5, 6: lost until three tokens are in the prediction
    assert not p.observe(40) and p.upcoming(1) == []
    assert not p.observe(41)
    for t in (4, 5):
        p.observe(t)
    assert p.upcoming(1) == []  # (41, 4, 5) is not in the prediction
    p.observe(6)  # (4, 5, 6) is: the answer is back at 7
    assert p.upcoming(2) == [7, 8]
    assert p.observe(7) and p.matched == 4  # 1, 2, 3 and 7: the resynchronised ones are not counted
    assert p.rejected() == 9 - 4


def test_a_place_of_the_prediction_is_accepted_once_however_often_the_answer_repeats_it():
    p = Prediction([1, 2, 3, 4])
    for t in (1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4):  # the answer repeats the text: found again each time
        p.observe(t)
    assert p.matched == 4 and p.rejected() == 0


def test_acceptance_follows_the_hits():
    good, bad = Prediction(list(range(100))), Prediction(list(range(100)))
    for t in range(30):
        good.observe(t)
        bad.observe(1000 + t)
    assert good.acceptance > 0.95 and bad.acceptance < 0.05


# -- the decision ------------------------------------------------------------------------------


def test_step_costs_interpolate_between_measured_counts():
    c = StepCosts()
    c.observe(1, 0.010)
    c.observe(9, 0.030)
    assert c.estimate(1) == pytest.approx(0.010)
    assert c.estimate(5) == pytest.approx(0.020)
    assert c.estimate(10) is None  # nothing measured at or above it
    assert c.estimate(1000) is None


def costs(per_token: float, fixed: float) -> StepCosts:
    c = StepCosts()
    for n in range(1, c.max_n + 1):
        c.observe(n, fixed + per_token * n)
    return c


class FixedCosts(StepCosts):
    """Step costs that the steps' measured times do not move: the same drafts every run."""

    def __init__(self, per_token: float, fixed: float) -> None:
        super().__init__()
        for n in range(1, self.max_n + 1):
            super().observe(n, fixed + per_token * n)

    def observe(self, n_tokens: int, seconds: float) -> None:
        pass


def test_a_good_prediction_is_drafted_when_a_longer_step_costs_little_more():
    p = Prediction(list(range(100)))
    p.acceptance = 0.9
    k = draft_length(p, costs(per_token=0.0005, fixed=0.010), base_tokens=1, base_yield=1.0, room=100)
    assert k >= 8


def test_nothing_is_drafted_when_each_token_costs_a_step():
    p = Prediction(list(range(100)))
    p.acceptance = 0.9
    assert draft_length(p, costs(per_token=0.010, fixed=0.0), base_tokens=1, base_yield=1.0, room=100) == 0


def test_a_useless_prediction_is_not_drafted():
    p = Prediction(list(range(100)))
    p.acceptance = 0.05
    assert draft_length(p, costs(per_token=0.0005, fixed=0.010), base_tokens=1, base_yield=1.0, room=100) == 0


def test_the_draft_fits_the_room_and_the_prediction_left():
    p = Prediction(list(range(5)))
    p.acceptance = 0.99
    flat = costs(per_token=0.0, fixed=0.010)
    assert draft_length(p, flat, base_tokens=1, base_yield=1.0, room=100) == 4
    assert draft_length(Prediction(list(range(100))), flat, 1, 1.0, room=1) == 0


def test_an_unmeasured_length_is_tried_only_when_it_would_pay_at_twice_the_cost():
    c = StepCosts()
    c.observe(1, 0.010)
    p = Prediction(list(range(100)))
    p.acceptance = 0.5
    assert draft_length(p, c, 1, 1.0, 100) == 0  # 1 + 0.5 + 0.25 < 2
    p.acceptance = 0.8
    assert draft_length(p, c, 1, 1.0, 100) == DRAFT_CHOICES[0]
    assert expected_tokens(0.8, 2) == pytest.approx(1 + 0.8 + 0.64)


# -- the scheduler, real llama.cpp -------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    try:
        path = write_model(tmp_path_factory.mktemp("draft") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", path, n_ctx=512, parallel=2, n_threads=1, cache_ram_mib=0))
    yield reg.get("tiny")
    reg.stop_all()


@pytest.fixture
def drafting(engine):
    """Step costs that make every draft look worth it (a GPU's: a longer step costs what one token's does),
    fixed, so that the scheduler drafts from the first step and alike in every run; restored after."""
    saved = engine._costs
    engine._costs = FixedCosts(per_token=0.0, fixed=0.001)
    yield
    engine._costs = saved


def run(engine, prediction=(), n=40, temperature=0.0, **kw):
    prompt = tuple(engine.model.tokenize("Once upon a time, in a quiet harbor town,"))
    req = GenerationRequest(prompt, n, SamplingParams(seed=11, temperature=temperature), prediction=tuple(prediction),
                            ignore_eos=True, **kw)
    tokens_text, done = "", None
    for ev in engine.submit(req).events():
        if isinstance(ev, Delta):
            tokens_text += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        else:
            done = ev
    return tokens_text, done


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_a_followed_prediction_is_drafted_and_changes_nothing(engine, drafting, temperature):
    plain, d0 = run(engine, temperature=temperature)
    assert d0.usage.prediction is None
    predicted = engine.model.tokenize(plain, add_special=False)
    text, done = run(engine, predicted, temperature=temperature)
    assert text == plain
    u = done.usage
    assert u.completion_tokens == d0.usage.completion_tokens == 40
    assert u.prediction.drafted > 0 and u.prediction.draft_kept > 0
    # (the answer's text tokenized again is not always the tokens generated: some places differ)
    assert u.prediction.accepted >= 10 and u.prediction.rejected == len(predicted) - u.prediction.accepted


def test_an_edited_prediction_changes_nothing(engine, drafting):
    plain, _ = run(engine)
    tokens = engine.model.tokenize(plain, add_special=False)
    rng = np.random.default_rng(3)
    edited = list(tokens)
    for i in sorted(rng.choice(len(edited), size=4, replace=False), reverse=True):
        edited[i:i + 1] = [int(rng.integers(100, 1000)), int(rng.integers(100, 1000))]
    text, done = run(engine, edited)
    assert text == plain
    assert 0 < done.usage.prediction.draft_kept < done.usage.prediction.drafted  # some drafts were rejected


def test_a_useless_prediction_changes_nothing(engine, drafting):
    plain, _ = run(engine)
    text, done = run(engine, list(range(200, 260)))
    assert text == plain and done.usage.prediction.accepted == 0


def test_max_tokens_and_stops_end_a_drafted_answer_where_they_would(engine, drafting):
    plain, _ = run(engine, n=40)
    predicted = engine.model.tokenize(plain, add_special=False)
    short, done = run(engine, predicted, n=7)
    assert done.usage.completion_tokens == 7 and plain.startswith(short)
    stop = plain[len(plain) // 2 : len(plain) // 2 + 4]
    assert stop.strip()
    cut, done = run(engine, predicted, stop=(stop,))
    assert done.finish_reason == "stop" and cut == plain[: plain.index(stop)]


def test_logprobs_of_drafted_tokens_are_those_of_plain_decoding(engine, drafting):
    def lps(prediction):
        prompt = tuple(engine.model.tokenize("The river"))
        req = GenerationRequest(prompt, 12, SamplingParams(seed=1, temperature=0.0), logprobs=2, ignore_eos=True,
                                prediction=tuple(prediction))
        return [lp for ev in engine.submit(req).events() if isinstance(ev, Delta) for lp in ev.logprobs]

    plain = lps(())
    drafted = lps([engine.model.tokenize(lp.token, add_special=False)[0] for lp in plain if lp.token])
    assert [lp.token for lp in drafted] == [lp.token for lp in plain]
    assert np.allclose([lp.logprob for lp in drafted], [lp.logprob for lp in plain], atol=0.05)
