"""Reranking on the embedder with real llama.cpp and generated models, in-process: the BERT reranker
tools.modelgen writes (pooling rank, a classification head), its query-document layout (llama-server's,
with and without a GGUF rerank template), scores that do not depend on batching, and the refusals."""

import gevent
import numpy as np
import pytest

from appliance.engine.embedder import MAX_SEQS, classifier_head, gguf_pooling
from appliance.engine.errors import EmbeddingsDisabled, LoadRefused
from appliance.engine.events import NullObserver
from appliance.engine.llama import Batch, EmbeddingContext
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from tools.modelgen import ModelSpec, RerankerSpec, write_model

N_BATCH = 128
CLS, SEP = 101, 102  # the BERT (bge) vocabulary's [CLS] (its BOS) and [SEP]
QUERY = "what is the capital of France"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany.", ""]
TEMPLATE = "[CLS]{query}[SEP][SEP]{document}[SEP]"


class Counting(NullObserver):
    """Counts the embedding tokens reported; ignores the rest."""

    def __init__(self) -> None:
        self.embedded = 0

    def embedding_tokens(self, model, n) -> None:
        self.embedded += n


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rerank")
    try:
        return {"rr": write_model(d / "rr.gguf", RerankerSpec()),
                "tmpl": write_model(d / "tmpl.gguf", RerankerSpec(rerank_template=TEMPLATE)),
                "llama": write_model(d / "llama.gguf", ModelSpec(dtype="q8_0"))}
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test models: {e}")


@pytest.fixture(scope="module")
def observer():
    return Counting()


@pytest.fixture(scope="module")
def registry(files, observer):
    reg = ModelRegistry(observer=observer)
    s = Settings()
    common = {"n_ctx": 256, "parallel": 1, "n_batch": N_BATCH, "n_threads": 1}
    reg.load(s.model_settings("rr", files["rr"], **common))  # the GGUF says rank: no embeddings setting needed
    reg.load(s.model_settings("tmpl", files["tmpl"], **common))
    reg.load(s.model_settings("rr-cls", files["rr"], **common, embeddings=True, pooling="cls"))  # no head: states
    reg.load(s.model_settings("emb", files["llama"], **common, embeddings=True))
    yield reg
    reg.stop_all()


def scores(registry, name, query, documents):
    reranker = registry.embedder(name)
    return [float(v[0]) for v in reranker.submit(reranker.rerank_inputs(query, documents)).wait()]


def test_the_generated_model_is_a_reranker(files):
    assert classifier_head(files["rr"]) == {"cls", "out"}
    assert classifier_head(files["llama"]) == frozenset()
    assert classifier_head(files["rr"].parent / "missing.gguf") == frozenset()
    assert files["rr"].stat().st_size < 4 << 20


def test_a_rank_gguf_serves_rerank_and_says_so(registry):
    reranker = registry.embedder("rr")
    assert reranker.reranks and reranker.pooling == "rank" and gguf_pooling(reranker.model) == "rank"
    assert reranker.dimensions == 1 and reranker.n_tokens == N_BATCH
    assert registry.record("rr").status()["embeddings"] == {"pooling": "rank", "dimensions": 1,
                                                            "max_input_tokens": N_BATCH}
    # Another pooling setting makes the same file an embedding model.
    assert not registry.embedder("rr-cls").reranks and registry.embedder("rr-cls").dimensions == 64
    assert not registry.embedder("emb").reranks


def test_pairs_are_laid_out_as_llama_server_does(registry):
    model = registry.embedder("rr").model
    q = model.tokenize(QUERY, add_special=False)
    d = model.tokenize(DOCS[0], add_special=False)
    # BOS ([CLS]) where the vocabulary adds it, the query, SEP (BERT adds no EOS), the document.
    assert registry.embedder("rr").rerank_inputs(QUERY, DOCS[:1]) == [[CLS, *q, SEP, *d]]
    assert registry.embedder("rr").rerank_inputs("", [""]) == [[CLS, SEP]]
    # A rerank template: the text filled in, its special tokens read, nothing added.
    assert registry.embedder("tmpl").rerank_inputs(QUERY, DOCS[:1]) == [[CLS, *q, SEP, SEP, *d, SEP]]
    # Special-token text in a query is text without a template (llama-server tokenizes it so).
    assert registry.embedder("rr").rerank_inputs("[SEP]", ["x"])[0].count(SEP) == 1


def test_scores_are_raw_deterministic_and_independent_of_batching(registry):
    together = scores(registry, "rr", QUERY, DOCS)
    assert len(set(together)) == len(DOCS)  # distinct: the documents rank
    assert any(abs(s) > 1 for s in together)  # not normalized
    for doc, score in zip(DOCS, together, strict=True):
        assert scores(registry, "rr", QUERY, [doc])[0] == pytest.approx(score, rel=1e-4, abs=1e-5)
    assert scores(registry, "rr", QUERY, DOCS) == pytest.approx(together, rel=1e-5)
    assert scores(registry, "tmpl", QUERY, DOCS) != pytest.approx(together, rel=1e-3)  # another layout


def test_the_score_is_the_heads_output_of_the_pair_decoded_alone(registry):
    """Against the embedding context driven by hand: one pair, one decode, rank pooling."""
    reranker = registry.embedder("rr")
    pair = reranker.rerank_inputs(QUERY, DOCS[:1])[0]
    ctx = EmbeddingContext(reranker.model, n_tokens=N_BATCH, n_seq=1, pooling="rank", n_threads=1,
                           n_threads_batch=1, flash_attn="off")
    try:
        batch = Batch(N_BATCH)
        batch.add(pair, 0, 0, want_last_logits=True)
        batch.logits[: batch.n] = 1
        assert ctx.decode(batch) == 0
        alone = ctx.pooled(0)
    finally:
        ctx.close()
    assert alone is not None and alone.shape == (1,)
    assert scores(registry, "rr", QUERY, DOCS[:1])[0] == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-6)


def test_many_documents_and_concurrent_requests(registry):
    docs = [f"document number {i} about {'Paris' if i % 3 else 'bananas'}" for i in range(MAX_SEQS + 10)]
    alone = {i: scores(registry, "rr", QUERY, [docs[i]])[0] for i in (0, 1, MAX_SEQS + 5)}
    jobs = [gevent.spawn(scores, registry, "rr", QUERY, docs) for _ in range(3)]
    gevent.joinall(jobs, raise_error=True)
    for job in jobs:
        assert len(job.value) == len(docs)
        for i, score in alone.items():
            assert job.value[i] == pytest.approx(score, rel=1e-4, abs=1e-5)


def test_reranked_tokens_are_counted(registry, observer):
    before = observer.embedded
    pairs = registry.embedder("rr").rerank_inputs(QUERY, DOCS)
    registry.embedder("rr").submit(pairs).wait()
    assert observer.embedded - before == sum(len(p) for p in pairs) > 0


def test_a_reranker_serves_no_embeddings(registry):
    with pytest.raises(EmbeddingsDisabled, match="reranker"):
        registry.embedding_inputs("rr", ["hello"])
    with pytest.raises(ValueError, match="not a reranker"):
        registry.embedder("emb").rerank_inputs(QUERY, DOCS)


def test_pooling_rank_without_a_classification_head_is_refused_at_load(files):
    reg = ModelRegistry()
    with pytest.raises(LoadRefused, match="classification head"):
        reg.load(Settings().model_settings("bad", files["llama"], n_ctx=256, parallel=1, n_threads=1, pooling="rank"))
    assert reg.record("bad").state == "failed"
    reg.stop_all()


def test_the_head_outputs_what_numpy_computes_from_the_weights(registry, files):
    """The pooled state goes through cls (tanh) and cls.output: the score is that projection, so two
    documents' score difference is not noise from elsewhere (a check of the GGUF's head wiring)."""
    import gguf

    r = gguf.GGUFReader(files["rr"])
    t = {x.name: x for x in r.tensors}
    assert tuple(int(n) for n in t["cls.output.weight"].shape) == (64, 1)
    assert tuple(int(n) for n in t["cls.weight"].shape) == (64, 64)
    assert r.get_field("bert.pooling_type").contents() == 4
    assert r.get_field("bert.attention.causal").contents() is False
    hidden = EmbeddingContext(registry.embedder("rr").model, n_tokens=N_BATCH, n_seq=1, pooling="cls",
                              n_threads=1, n_threads_batch=1, flash_attn="off")
    try:
        batch = Batch(N_BATCH)
        batch.add(registry.embedder("rr").rerank_inputs(QUERY, DOCS[:1])[0], 0, 0, want_last_logits=True)
        batch.logits[: batch.n] = 1
        assert hidden.decode(batch) == 0
        state = hidden.pooled(0)
    finally:
        hidden.close()
    assert state is not None

    def f32(name):
        return np.asarray(gguf.dequantize(t[name].data, t[name].tensor_type), dtype=np.float64).reshape(
            [int(n) for n in reversed(t[name].shape)])

    dense = np.tanh(f32("cls.weight") @ state + f32("cls.bias"))
    expected = float((f32("cls.output.weight") @ dense + f32("cls.output.bias"))[0])
    # (llama.cpp multiplies q8_0 weights by q8_0-quantized activations: 4e-3 apart, measured)
    assert scores(registry, "rr", QUERY, DOCS[:1])[0] == pytest.approx(expected, rel=1e-2)
