"""Predicted Outputs through the real server on real weights (Gemma 3 270M), with the official SDK.

The answer with a prediction must be the answer without one (greedy here; a near-tie aside, see
`same_unless_a_near_tie`), the usage must count the prediction, and the signature must cover it. Whether the scheduler drafts at all depends on the step
costs it measures on this machine, so nothing here asserts a speed-up (`make bench` measures it).
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from appliance_it import Server

from attestation import signing

pytestmark = pytest.mark.integration

GEMMA = "gemma3-270m"
TEXT = ("The harbor town wakes early. Fishing boats leave before dawn, and the market opens when they come "
        "back with the morning catch. Visitors walk along the old stone pier to the lighthouse, which has "
        "guided ships into the bay for more than a century.")
ASK = [{"role": "user", "content": "Rewrite the text below, saying 'port' instead of 'harbor'. Keep everything "
                                   "else the same. Answer with the rewritten text only.\n\n" + TEXT}]


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={GEMMA: real_model}, config="[model_defaults]\nn_ctx = 2048\nparallel = 2\n",
                          name="gemma-predicted")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gemma: Server):
    with gemma.openai() as c:
        yield c


def same_unless_a_near_tie(plain, predicted) -> None:
    """The answers' tokens are the same, or part where the answer without a prediction had several
    candidates close together (the one taken with a prediction among its five likeliest, within 1.0 of
    the first in log-probability). Drafted tokens are verified with logits from a several-token step,
    whose kernels round differently from a one-token step's (as in llama.cpp's speculative decoding);
    on this Q4_K model that moves the less likely candidates' log-probabilities by up to ~0.5 (measured;
    a prefix reused from the KV cache instead of decoded again moves them as much), so where the model
    is unsure a near-tie may go the other way. A wrong draft kept, or wrong KV, would part where the
    model is sure."""
    ours = [t.token for t in predicted.choices[0].logprobs.content]
    ref = plain.choices[0].logprobs.content
    theirs = [t.token for t in ref]
    i = next((k for k, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if i is None:
        assert len(ours) == len(theirs)
        assert predicted.choices[0].message.content == plain.choices[0].message.content
        return
    top = {t.token: t.logprob for t in ref[i].top_logprobs}
    assert ours[i] in top and max(top.values()) - top[ours[i]] < 1.0, (i, theirs[i], ours[i], top)


def test_the_answer_is_the_same_with_a_prediction_and_its_usage_counts_it(gemma: Server, client):
    ask = dict(model=GEMMA, messages=ASK, temperature=0, max_tokens=120, logprobs=True, top_logprobs=5)
    client.chat.completions.create(**ask)  # the prompt's KV is then cached, for both runs below alike
    plain = client.chat.completions.create(**ask)
    assert plain.usage.completion_tokens_details is None  # no prediction, no prediction counts
    predicted = client.chat.completions.create(**ask, prediction={"type": "content", "content": TEXT})
    same_unless_a_near_tie(plain, predicted)
    details = predicted.usage.completion_tokens_details
    n_predicted = len(gemma.post("/tokenize", json={"content": TEXT, "add_special": False}).json()["tokens"])
    assert details.accepted_prediction_tokens > 0  # the answer repeats most of the text
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == n_predicted
    timings = predicted.model_extra["timings"]
    assert 0 <= timings["draft_n_accepted"] <= timings["draft_n"]


def test_the_prediction_counts_are_inside_the_signature(gemma: Server):
    pk = signing.public_key_from_b64(gemma.get("/v1/keys").json()["public_key"])
    raw = json.dumps({"model": GEMMA, "messages": ASK, "temperature": 0, "max_tokens": 24,
                      "prediction": {"type": "content", "content": [{"type": "text", "text": TEXT}]}}).encode()
    r = gemma.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    signing.verify_response(pk, request=signing.RequestInfo("POST", "/v1/chat/completions", raw), status=200,
                            headers=dict(r.headers), body=r.content)
    assert "accepted_prediction_tokens" in r.json()["usage"]["completion_tokens_details"]
    tampered = r.content.replace(b'"accepted_prediction_tokens":', b'"accepted_prediction_tokens":1')
    assert tampered != r.content
    with pytest.raises(signing.VerificationError):
        signing.verify_response(pk, request=signing.RequestInfo("POST", "/v1/chat/completions", raw), status=200,
                                headers=dict(r.headers), body=tampered)


def test_a_streamed_answer_with_a_prediction_carries_its_counts(client):
    stream = client.chat.completions.create(model=GEMMA, messages=ASK, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True},
                                            prediction={"type": "content", "content": TEXT})
    text, usage = "", None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        usage = chunk.usage or usage
    assert text and usage is not None and usage.completion_tokens == 40
    details = usage.completion_tokens_details
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0


@pytest.mark.parametrize("prediction, extra", [
    ({"type": "content", "content": TEXT}, {"n": 2}),
    ({"type": "text", "content": TEXT}, {}),
    ({"type": "content", "content": 5}, {}),
    ({"type": "content"}, {}),
    ("just text", {}),
])
def test_a_bad_prediction_is_a_400_naming_it(gemma: Server, prediction, extra):
    r = gemma.post("/v1/chat/completions", json={"model": GEMMA, "messages": ASK, "max_tokens": 4,
                                                 "prediction": prediction, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"].startswith("prediction") and err["type"] == "invalid_request_error", err
    assert gemma.get("/health").status_code == 200


def test_the_sdk_refuses_nothing_it_sends(client):
    # The SDK's own typed prediction parameter goes through unchanged.
    r = client.chat.completions.create(model=GEMMA, messages=ASK, max_tokens=8, temperature=0,
                                       prediction={"type": "content", "content": "The port town wakes early."})
    assert r.usage.completion_tokens_details is not None
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=GEMMA, messages=ASK, max_tokens=8, n=2,
                                       prediction={"type": "content", "content": TEXT})
