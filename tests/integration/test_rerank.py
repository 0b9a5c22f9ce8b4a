"""/v1/rerank on the real server with real llama.cpp: the synthetic BERT reranker tools.modelgen writes
(pooling rank, a classification head; with and without a GGUF rerank template), scores and order equal
to llama.cpp's own llama-server --rerank on the same file, the answer's shape, bad input answered in the
OpenAI error shape naming the field while the server keeps serving, every answer signed, the pairs'
tokens counted in /metrics.

llama-server is built from the same sdist by scripts/llama-server.sh and cached (`make bench` builds
it); its parity test is skipped only where that cached build is absent.
"""

from __future__ import annotations

import datetime
import json
import re

import pytest
import requests
from appliance_it import Server, assert_error, cached_model, llama_server

from attestation import signing
from tools.modelgen import RerankerSpec

pytestmark = pytest.mark.integration

RR, TMPL, EMB, PLAIN = "rr", "rr-tmpl", "emb", "plain"
N_BATCH = 512
RERANKER = RerankerSpec()
TEMPLATED = RerankerSpec(rerank_template="[CLS]{query}[SEP][SEP]{document}[SEP]", name="appliance-reranker-tmpl")
QUERY = "What is the capital of France?"
DOCUMENTS = [
    "Paris is the capital and largest city of France.",
    "Bananas are an excellent source of potassium.",
    "Berlin is the capital of Germany; Paris is the capital of France.",
    "",
    "naïve café 日本語 😀\n\ttabs",
    "[SEP] special-token text [CLS] in a document",
    "A longer passage about nothing in particular. " * 20,
    "france",
]
MAX_REL = 1e-3
MAX_AGE = datetime.timedelta(minutes=5)


@pytest.fixture(scope="module")
def files(model_files):
    return {RR: cached_model(RERANKER), TMPL: cached_model(TEMPLATED), PLAIN: model_files.main}


@pytest.fixture(scope="module")
def rr(start_server, files) -> Server:
    config = f"""
[model_defaults]
n_ctx = 512
parallel = 1
n_batch = {N_BATCH}
n_threads = 1

[[models]]
name = "{RR}"
path = "{files[RR]}"

[[models]]
name = "{TMPL}"
path = "{files[TMPL]}"

[[models]]
name = "{EMB}"
path = "{files[PLAIN]}"
embeddings = true

[[models]]
name = "{PLAIN}"
path = "{files[PLAIN]}"
"""
    server = start_server(config=config, name="rerank")
    yield server
    server.stop()


def post(server: Server, path: str, body: object) -> requests.Response:
    r = server.post(path, json=body)
    assert r.headers.get("Signature"), r.headers
    return r


def rerank(server: Server, model: str, query: str, documents: list[str], **kw) -> dict:
    r = post(server, "/v1/rerank", {"model": model, "query": query, "documents": documents, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_the_answer_is_llama_servers_shape_best_first(rr):
    body = rerank(rr, RR, QUERY, DOCUMENTS)
    assert list(body) == ["model", "object", "usage", "results"]
    assert body["model"] == RR and body["object"] == "list"
    results = body["results"]
    assert sorted(r["index"] for r in results) == list(range(len(DOCUMENTS)))
    assert all(set(r) == {"index", "relevance_score"} for r in results)
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == len(scores)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(DOCUMENTS) * 8

    top = rerank(rr, RR, QUERY, DOCUMENTS, top_n=3, return_documents=True)
    assert [(r["index"], r["relevance_score"]) for r in top["results"]] == \
        [(r["index"], r["relevance_score"]) for r in results[:3]]
    assert [r["document"] for r in top["results"]] == [{"text": DOCUMENTS[r["index"]]} for r in results[:3]]
    assert top["usage"] == body["usage"]  # every document is scored, whatever top_n keeps
    assert len(rerank(rr, RR, QUERY, DOCUMENTS, top_n=100)["results"]) == len(DOCUMENTS)


def test_a_score_does_not_depend_on_what_it_was_batched_with(rr):
    together = {r["index"]: r["relevance_score"] for r in rerank(rr, RR, QUERY, DOCUMENTS)["results"]}
    for i, doc in enumerate(DOCUMENTS):
        alone = rerank(rr, RR, QUERY, [doc])["results"][0]["relevance_score"]
        assert alone == pytest.approx(together[i], rel=1e-4, abs=1e-6), doc


def test_status_says_it_is_a_reranker(rr):
    assert rr.status_of(RR)["embeddings"] == {"pooling": "rank", "dimensions": 1, "max_input_tokens": N_BATCH}
    assert rr.status_of(PLAIN)["embeddings"] is None


def _embedded(server: Server, model: str) -> float:
    text = server.get("/metrics").text
    m = re.search(rf'^appliance_embedding_tokens_total{{model="{re.escape(model)}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_reranked_tokens_are_counted_as_embedding_tokens(rr):
    before = _embedded(rr, RR)
    body = rerank(rr, RR, "count me", ["one document", "and another"])
    assert _embedded(rr, RR) - before == body["usage"]["prompt_tokens"] > 0


LONG = "word " * (N_BATCH + 10)
BAD = [
    ({"model": PLAIN, "query": "q", "documents": ["a"]}, 400, "model", "model_not_reranker"),
    ({"model": EMB, "query": "q", "documents": ["a"]}, 400, "model", "model_not_reranker"),
    ({"model": "no-such-model", "query": "q", "documents": ["a"]}, 404, "model", "model_not_found"),
    ({"model": RR, "query": "q", "documents": []}, 400, "documents", None),
    ({"model": RR, "query": "q"}, 400, "documents", None),
    ({"model": RR, "query": "q", "documents": "a"}, 400, "documents", None),
    ({"model": RR, "query": "q", "documents": ["a", None]}, 400, "documents", None),
    ({"model": RR, "documents": ["a"]}, 400, "query", None),
    ({"model": RR, "query": 7, "documents": ["a"]}, 400, "query", None),
    ({"model": RR, "query": "q", "documents": ["a"], "top_n": 0}, 400, "top_n", None),
    ({"model": RR, "query": "q", "documents": ["a"], "top_n": -1}, 400, "top_n", None),
    ({"model": RR, "query": "q", "documents": ["a"], "return_documents": "yes"}, 400, "return_documents", None),
    ({"model": RR, "query": "q", "documents": ["fine", LONG]}, 400, "documents", "context_length_exceeded"),
    ({"model": TMPL, "query": "q", "documents": [LONG]}, 400, "documents", "context_length_exceeded"),
    ({"model": RR, "query": LONG, "documents": ["a"]}, 400, "query", "context_length_exceeded"),
    ({"model": RR, "query": "a\ud800b", "documents": ["a"]}, 400, "query", None),
    ({"model": RR, "query": "q", "documents": ["a", "a\ud800b"]}, 400, "documents", None),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_input_is_an_openai_error_naming_the_field_and_the_server_keeps_serving(rr, body, status, param, code):
    r = post(rr, "/v1/rerank", body)
    err = assert_error(r, status, "invalid_request_error", param=param, **({"code": code} if code else {}))
    assert param in err["message"] or code in ("model_not_reranker", "model_not_found")
    assert rr.proc.poll() is None
    assert len(rerank(rr, RR, "still", ["here"])["results"]) == 1
    assert rr.get("/health").status_code == 200


def test_a_reranker_serves_no_embeddings(rr):
    r = post(rr, "/v1/embeddings", {"model": RR, "input": "hello"})
    err = assert_error(r, 400, "invalid_request_error", param="model", code="embeddings_not_enabled")
    assert "reranker" in err["message"]


def test_load_model_with_pooling_rank(rr, files):
    # The reranker file under another name, rank by the body (its GGUF says so too).
    r = post(rr, "/load_model", {"model_name": "rr2", "model_path": str(files[RR]), "pooling": "rank", "n_ctx": 512})
    assert r.status_code == 200, r.text
    assert r.json()["model"]["embeddings"]["pooling"] == "rank"
    again, first = (rerank(rr, m, QUERY, DOCUMENTS[:3])["results"] for m in ("rr2", RR))
    assert [r["index"] for r in again] == [r["index"] for r in first]
    assert [r["relevance_score"] for r in again] == pytest.approx([r["relevance_score"] for r in first], rel=1e-6)
    assert post(rr, "/unload_model", {"model_name": "rr2"}).status_code == 200
    # pooling rank on a model without a classification head: refused at load, naming why.
    r = post(rr, "/load_model", {"model_name": "bad", "model_path": str(files[PLAIN]), "pooling": "rank"})
    err = assert_error(r, 400, "invalid_request_error")
    assert "classification head" in err["message"]
    assert len(rerank(rr, RR, "still", ["here"])["results"]) == 1


def test_every_answer_is_signed_by_the_published_key(rr):
    pk = signing.public_key_from_b64(rr.get("/v1/keys").json()["public_key"])
    for body in ({"model": RR, "query": "naïve", "documents": ["𓀀", "b"], "return_documents": True},
                 {"model": TMPL, "query": "q", "documents": ["d"], "top_n": 1},
                 {"model": PLAIN, "query": "q", "documents": ["d"]},
                 {"model": RR, "query": "q", "documents": []}):
        raw = json.dumps(body).encode()
        r = requests.post(rr.url + "/v1/rerank", data=raw, timeout=60,
                          headers={"Content-Type": "application/json", "Connection": "close"})
        v = signing.verify_response(pk, request=signing.RequestInfo("POST", "/v1/rerank", raw), status=r.status_code,
                                    headers=dict(r.headers), body=r.content, max_age=MAX_AGE)
        assert v is not None and r.status_code in (200, 400)


# ---------------------------------------------------------------------------------------------
# The reference: llama-server --rerank on the same file


@pytest.mark.parametrize("model", [RR, TMPL])
def test_the_same_scores_and_order_as_llama_server(rr, files, model, tmp_path):
    # Our reranking context: one decode of at most n_batch tokens per pair, no flash attention.
    args = ["--rerank", "-fa", "off", "-t", "1", "-c", str(N_BATCH), "-b", str(N_BATCH), "-ub", str(N_BATCH),
            "-np", "1"]
    queries = [QUERY, "", "bananas", "naïve café [SEP]"]
    worst = 0.0
    with llama_server(files[model], args, tmp_path) as url:
        for query in queries:
            theirs = requests.post(url + "/v1/rerank", json={"model": model, "query": query, "documents": DOCUMENTS},
                                   timeout=300)
            assert theirs.status_code == 200, theirs.text
            ref = theirs.json()
            ours = rerank(rr, model, query, DOCUMENTS)
            assert set(ref) == set(ours) and ref["object"] == ours["object"] and ref["model"] == ours["model"]
            assert ours["usage"] == ref["usage"], query  # the same tokens: the same layout
            assert [r["index"] for r in ours["results"]] == [r["index"] for r in ref["results"]], query
            for a, b in zip(ours["results"], ref["results"], strict=True):
                assert set(a) == set(b) == {"index", "relevance_score"}
                worst = max(worst, abs(a["relevance_score"] - b["relevance_score"]) / abs(b["relevance_score"]))
            top = requests.post(url + "/v1/rerank", json={"query": query, "documents": DOCUMENTS, "top_n": 2},
                                timeout=300).json()
            assert [r["index"] for r in rerank(rr, model, query, DOCUMENTS, top_n=2)["results"]] == \
                [r["index"] for r in top["results"]]
    print(f"\n{model}: max relative score difference against llama-server {worst:.2e}")
    assert worst <= MAX_REL
