"""The embedder with real llama.cpp and a generated model, in-process (no server, no sockets)."""

import gevent
import numpy as np
import pytest

from appliance.engine.embedder import MAX_SEQS, ClientGone, gguf_pooling, l2_normalized
from appliance.engine.errors import EmbeddingsDisabled, InputTooLong, InvalidPrompt, UnknownModel
from appliance.engine.events import NullObserver
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings

N_BATCH = 64


class Counting(NullObserver):
    """Counts the embedding tokens reported; ignores the rest."""

    def __init__(self) -> None:
        self.embedded = 0

    def embedding_tokens(self, model, n) -> None:
        self.embedded += n



@pytest.fixture(scope="module")
def observer():
    return Counting()


@pytest.fixture(scope="module")
def registry(model_path, observer):
    reg = ModelRegistry(observer=observer)
    s = Settings()
    reg.load(s.model_settings("emb", model_path, n_ctx=256, parallel=1, n_batch=N_BATCH, n_threads=1, embeddings=True))
    reg.load(s.model_settings("emb-last", model_path, n_ctx=256, parallel=1, n_batch=N_BATCH, n_threads=1,
                              embeddings=True, pooling="last"))
    reg.load(s.model_settings("plain", model_path, n_ctx=256, parallel=1, n_threads=1))
    yield reg
    reg.stop_all()


def embed(registry, inputs, name="emb"):
    embedder, tokens = registry.embedding_inputs(name, inputs)
    return embedder.submit(tokens).wait()


def cos(a, b) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_vectors_are_unit_length_deterministic_and_sized(registry):
    embedder = registry.embedder("emb")
    assert embedder.dimensions == 64 and embedder.n_tokens == N_BATCH and embedder.pooling == "mean"
    a, b = embed(registry, ["Hello, world!", "Something else entirely"])
    assert a.dtype == np.float32 and a.shape == (64,)
    assert abs(float(np.linalg.norm(a)) - 1) < 1e-5 and abs(float(np.linalg.norm(b)) - 1) < 1e-5
    assert cos(a, b) < 0.999
    again = embed(registry, ["Hello, world!"])[0]
    assert cos(a, again) > 0.99999


def test_an_input_embeds_alike_alone_or_batched_with_others(registry):
    texts = [f"text number {i} " * (i % 5 + 1) for i in range(12)]
    together = embed(registry, texts)
    for text, v in zip(texts, together, strict=True):
        assert cos(embed(registry, [text])[0], v) > 0.9999, text


def test_more_inputs_than_one_decode_holds_and_concurrent_requests(registry):
    texts = [f"input {i}" for i in range(MAX_SEQS + 20)]  # more sequences than one decode takes
    alone = {t: embed(registry, [t])[0] for t in texts[:5]}
    jobs = [gevent.spawn(embed, registry, texts) for _ in range(3)]
    gevent.joinall(jobs, raise_error=True)
    for job in jobs:
        assert len(job.value) == len(texts)
        for t in alone:
            assert cos(job.value[texts.index(t)], alone[t]) > 0.9999


def test_token_ids_embed_like_their_text(registry):
    model = registry.get("emb").model
    ids = model.tokenize("Hello, world!", add_special=True, parse_special=True)
    assert cos(embed(registry, [ids])[0], embed(registry, ["Hello, world!"])[0]) > 0.99999


def test_pooling_setting_changes_the_vector(registry):
    assert registry.embedder("emb-last").pooling == "last"
    assert cos(embed(registry, ["Hello there"], "emb-last")[0], embed(registry, ["Hello there"])[0]) < 0.999


def test_gguf_without_pooling_key_means_mean(registry):
    assert gguf_pooling(registry.get("emb").model) == "mean"


def test_refusals(registry):
    with pytest.raises(EmbeddingsDisabled, match="embeddings = true"):
        registry.embedder("plain")
    with pytest.raises(UnknownModel):
        registry.embedder("nope")
    with pytest.raises(InputTooLong) as e:
        embed(registry, ["ok", "word " * (N_BATCH + 5)])
    assert e.value.index == 1 and e.value.limit == N_BATCH
    with pytest.raises(InvalidPrompt):
        embed(registry, [[1, 2, 1 << 30]])
    with pytest.raises(InvalidPrompt):
        embed(registry, [[]])
    assert len(embed(registry, ["still serving"])) == 1


def test_embedded_tokens_are_counted(registry, observer):
    before = observer.embedded
    embedder, tokens = registry.embedding_inputs("emb", ["count these tokens", "and these"])
    embedder.submit(tokens).wait()
    assert observer.embedded - before == sum(len(t) for t in tokens)


def test_status_reports_embeddings(registry):
    status = registry.record("emb").status()
    assert status["embeddings"] == {"pooling": "mean", "dimensions": 64, "max_input_tokens": N_BATCH}
    assert registry.record("plain").status()["embeddings"] is None


def test_unload_frees_both_contexts_and_generation_still_works_meanwhile(model_path):
    reg = ModelRegistry()
    reg.load(Settings().model_settings("both", model_path, n_ctx=128, parallel=1, n_batch=N_BATCH, n_threads=1,
                                       embeddings=True))
    from appliance.engine.events import Done, GenerationRequest
    from appliance.engine.llama import SamplingParams

    engine = reg.get("both")
    gen = engine.submit(GenerationRequest(tuple(engine.model.tokenize("Hi")), 4, SamplingParams(seed=1)))
    vectors = embed(reg, ["Hi"], "both")
    assert any(isinstance(ev, Done) for ev in gen.events()) and len(vectors) == 1
    reg.unload("both")
    with pytest.raises(UnknownModel):
        reg.embedder("both")


def test_l2_normalized_leaves_a_zero_vector_zero():
    assert not l2_normalized(np.zeros(4, dtype=np.float32)).any()
    v = l2_normalized(np.array([3, 4], dtype=np.float32))
    assert np.allclose(v, [0.6, 0.8])


def test_the_weights_outlive_the_scheduler_until_the_embedder_stops(model_path):
    reg = ModelRegistry()
    reg.load(Settings().model_settings("own", model_path, n_ctx=128, parallel=1, n_batch=N_BATCH, n_threads=1,
                                       embeddings=True))
    embedder = reg.embedder("own")
    assert reg.get("own").stop(timeout=10)  # the scheduler thread closes its hold on the model
    assert embedder.model.ptr is not None
    assert len(embedder.submit([[1, 2, 3]]).wait()) == 1
    assert embedder.stop(timeout=10) and embedder.stop(timeout=1)  # stopping twice returns at once
    assert embedder.model.ptr is None


def test_abort_all_refuses_and_ends_the_embedder(model_path):
    from appliance.engine.errors import ShuttingDown

    reg = ModelRegistry()
    reg.load(Settings().model_settings("ab", model_path, n_ctx=128, parallel=1, n_batch=N_BATCH, n_threads=1,
                                       embeddings=True))
    embedder = reg.embedder("ab")
    reg.abort_all(ShuttingDown())
    with pytest.raises(ShuttingDown):
        embedder.submit([[1, 2]])
    reg.stop_all(timeout=10)


def test_a_cancelled_job_returns_at_once_and_the_embedder_serves_on(registry):
    embedder, tokens = registry.embedding_inputs("emb", [f"a long wait {i}" for i in range(MAX_SEQS * 4)])
    job = embedder.submit(tokens)
    job.cancel()  # as the disconnect watcher does when the client goes
    with pytest.raises(ClientGone):
        job.wait()
    assert embed(registry, ["still serving"])[0].shape == (64,)
