"""/v1/embeddings and /v1/rerank in-process, on the fake registry: the OpenAI shape (float and base64),
every input form, dimensions, the refusals with the field they name, each response signed, and the
embedding-token metric with the real embedder's counts left to tests/unit/engine/test_embedder.py."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from appliance.engine.embedder import l2_normalized
from appliance.settings import Settings
from appliance.web.app import create_app
from tests.conftest import FakeEmbedder, FakeRegistry
from tests.conftest import SignedClient as Client
from tests.conftest import openai_error as error


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("emb", embeddings=True)
    reg.add("plain")
    return reg


@pytest.fixture
def api(registry) -> Client:
    app, _ = create_app(Settings(), models=registry)
    return Client(app)


def expected(tokens: list[int]) -> list[float]:
    return l2_normalized(FakeEmbedder.vector(tokens)).tolist()


def test_one_text_in_the_openai_shape(api, registry):
    r = api.post("/v1/embeddings", {"model": "emb", "input": "hello"})
    assert r.status_code == 200, r.text
    tokens = registry.engine("emb").model.tokenize("hello")
    assert r.json == {"object": "list", "model": "emb",
                      "data": [{"object": "embedding", "index": 0, "embedding": pytest.approx(expected(tokens))}],
                      "usage": {"prompt_tokens": len(tokens), "total_tokens": len(tokens)}}


def test_texts_token_ids_and_token_id_lists(api, registry):
    model = registry.engine("emb").model
    r = api.post("/v1/embeddings", {"model": "emb", "input": ["a b", "cd", ""]})
    assert [d["index"] for d in r.json["data"]] == [0, 1, 2]
    assert r.json["data"][1]["embedding"] == pytest.approx(expected(model.tokenize("cd")))
    assert r.json["usage"]["prompt_tokens"] == sum(len(model.tokenize(t)) for t in ["a b", "cd", ""])
    r = api.post("/v1/embeddings", {"model": "emb", "input": [5, 6, 7]})
    assert len(r.json["data"]) == 1 and r.json["data"][0]["embedding"] == pytest.approx(expected([5, 6, 7]))
    r = api.post("/v1/embeddings", {"model": "emb", "input": [[5, 6], [7]]})
    assert [d["embedding"] for d in r.json["data"]] == [pytest.approx(expected([5, 6])), pytest.approx(expected([7]))]
    assert r.json["usage"] == {"prompt_tokens": 3, "total_tokens": 3}


def test_base64_is_little_endian_float32(api):
    floats = api.post("/v1/embeddings", {"model": "emb", "input": [[9, 10]]}).json["data"][0]["embedding"]
    r = api.post("/v1/embeddings", {"model": "emb", "input": [[9, 10]], "encoding_format": "base64"})
    raw = base64.b64decode(r.json["data"][0]["embedding"])
    assert np.frombuffer(raw, dtype="<f4").tolist() == floats


def test_dimensions_truncate_and_normalize_again(api):
    r = api.post("/v1/embeddings", {"model": "emb", "input": [[9, 10, 11]], "dimensions": 3})
    v = r.json["data"][0]["embedding"]
    full = expected([9, 10, 11])
    assert len(v) == 3 and abs(np.linalg.norm(v) - 1) < 1e-6
    assert v == pytest.approx(l2_normalized(np.array(full[:3], dtype=np.float32)).tolist())
    assert len(api.post("/v1/embeddings", {"model": "emb", "input": "x", "dimensions": 8}).json["data"][0]["embedding"]) == 8


BAD = [
    ({"model": "plain", "input": "hi"}, 400, "model", "embeddings_not_enabled"),
    ({"model": "nope", "input": "hi"}, 404, "model", "model_not_found"),
    ({"model": "emb"}, 400, "input", None),
    ({"model": "emb", "input": 42}, 400, "input", None),
    ({"model": "emb", "input": []}, 400, "input", None),
    ({"model": "emb", "input": [[]]}, 400, "input", None),
    ({"model": "emb", "input": [1, -1]}, 400, "input", None),
    ({"model": "emb", "input": [1, 64]}, 400, "input", None),  # the fake vocabulary has 64 ids
    ({"model": "emb", "input": ["a", 1]}, 400, "input", None),
    ({"model": "emb", "input": "x" * 40}, 400, "input", "context_length_exceeded"),
    ({"model": "emb", "input": "hi", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": "emb", "input": "hi", "dimensions": 0}, 400, "dimensions", None),
    ({"model": "emb", "input": "hi", "dimensions": 9}, 400, "dimensions", None),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_refusals_name_the_field(api, body, status, param, code):
    e = error(api.post("/v1/embeddings", body), status)
    assert e["param"] == param, e
    if code is not None:
        assert e["code"] == code, e


def test_an_input_list_past_openais_limit_is_refused(api):
    assert error(api.post("/v1/embeddings", {"model": "emb", "input": ["a"] * 2049}), 400)["param"] == "input"


def test_rerank_refuses_a_model_that_is_not_a_reranker(api):
    e = error(api.post("/v1/rerank", {"model": "emb", "query": "q", "documents": ["a", "b"], "top_n": 1}), 400)
    assert e["code"] == "model_not_reranker" and e["param"] == "model" and "rank" in e["message"]
    assert error(api.post("/v1/rerank", {"model": "emb", "query": "q", "documents": []}), 400)["param"] == "documents"
    assert error(api.post("/v1/rerank", {"model": "nope", "query": "q", "documents": ["a"]}), 404)["param"] == "model"


def test_load_model_takes_the_embeddings_settings(api, registry, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    r = api.post("/load_model", {"model_name": "new", "model_path": str(f), "embeddings": True, "pooling": "cls"})
    assert r.status_code == 200, r.text
    settings = registry.record("new").settings
    assert settings.embeddings is True and settings.pooling == "cls"
    e = error(api.post("/load_model", {"model_name": "x", "model_path": str(f), "pooling": "max"}), 400)
    assert e["param"] == "pooling"
