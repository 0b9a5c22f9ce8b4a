"""/v1/embeddings on the real server with real weights (Gemma 3 270M) and the synthetic model: the
official openai SDK (float and base64), list and token inputs, vectors equal to llama.cpp's own
(llama-server --embeddings, and llama-cpp-python's `Llama(embedding=True).embed()`), bad input answered
in the OpenAI error shape while the server keeps serving, every response signed, the embedded tokens
counted in /metrics; /v1/rerank refusing a model that is not a reranker.

llama-server is built from the same sdist by scripts/llama-server.sh and cached (`make bench` builds
it); its parity test is skipped only where that cached build is absent.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from appliance_it import ROOT, Server, assert_error, llama_server

from attestation import signing

pytestmark = pytest.mark.integration

GEMMA, TINY, PLAIN = "gemma3-270m", "tiny", "plain"
N_BATCH = 512
TEXTS = [
    "Hello world",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "naïve café 日本語 😀\n\ttabs\n\nand newlines",
    "<start_of_turn>user\nHi<end_of_turn>",
    "A longer passage. " * 40,
    "",
]
MAX_AGE = datetime.timedelta(minutes=5)
MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def emb(start_server, real_model: Path, model_files) -> Server:
    config = f"""
[model_defaults]
n_ctx = 1024
parallel = 1
n_batch = {N_BATCH}
n_threads = 1

[[models]]
name = "{GEMMA}"
path = "{real_model}"
embeddings = true

[[models]]
name = "{TINY}"
path = "{model_files.main}"
embeddings = true

[[models]]
name = "{PLAIN}"
path = "{model_files.main}"
"""
    server = start_server(config=config, name="embeddings")
    yield server
    server.stop()


def post(server: Server, path: str, body: object) -> requests.Response:
    r = server.post(path, json=body)
    assert r.headers.get("Signature"), r.headers
    return r


def vectors(server: Server, model: str, inputs: object, **kw) -> list[np.ndarray]:
    r = post(server, "/v1/embeddings", {"model": model, "input": inputs, **kw})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == model
    assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
    return [np.asarray(d["embedding"], dtype=np.float64) for d in body["data"]]


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_openai_sdk_float_and_base64(emb):
    client = emb.openai()
    floats = client.embeddings.create(model=GEMMA, input=TEXTS[:3], encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2] and floats.model == GEMMA
    assert all(len(d.embedding) == 640 for d in floats.data)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3
    for d in floats.data:
        assert abs(np.linalg.norm(d.embedding) - 1) < 1e-4
    # The SDK asks for base64 unless told otherwise, and decodes it itself.
    decoded = client.embeddings.create(model=GEMMA, input=TEXTS[:3])
    for a, b in zip(floats.data, decoded.data, strict=True):
        assert np.allclose(a.embedding, b.embedding, rtol=0, atol=1e-7)
    raw = post(emb, "/v1/embeddings", {"model": GEMMA, "input": TEXTS[0], "encoding_format": "base64"}).json()
    assert np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4").tolist() == \
        pytest.approx(floats.data[0].embedding, abs=1e-7)


def test_token_inputs_embed_like_their_text(emb):
    ids = [post(emb, "/tokenize", {"model": GEMMA, "content": t, "add_special": True}).json()["tokens"]
           for t in TEXTS[:2]]
    by_text = vectors(emb, GEMMA, TEXTS[:2])
    assert cos(vectors(emb, GEMMA, ids[0])[0], by_text[0]) > 0.99999
    for a, b in zip(vectors(emb, GEMMA, ids), by_text, strict=True):
        assert cos(a, b) > 0.99999


def test_an_input_alone_equals_it_batched_and_concurrent(emb):
    together = vectors(emb, GEMMA, TEXTS)
    for text, v in zip(TEXTS, together, strict=True):
        assert cos(vectors(emb, GEMMA, text)[0], v) > 0.9999, text


def test_dimensions_truncate_and_normalize_again(emb):
    full = vectors(emb, GEMMA, TEXTS[0])[0]
    short = emb.openai().embeddings.create(model=GEMMA, input=TEXTS[0], dimensions=128, encoding_format="float")
    v = np.asarray(short.data[0].embedding)
    assert len(v) == 128 and abs(np.linalg.norm(v) - 1) < 1e-5
    assert cos(v, full[:128]) > 0.99999


def test_status_says_which_models_serve_embeddings(emb):
    assert emb.status_of(GEMMA)["embeddings"] == {"pooling": "mean", "dimensions": 640, "max_input_tokens": N_BATCH}
    assert emb.status_of(PLAIN)["embeddings"] is None


def _embedded(server: Server, model: str) -> float:
    text = server.get("/metrics").text
    m = re.search(rf'^appliance_embedding_tokens_total{{model="{re.escape(model)}"}} ([0-9.e+]+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def test_embedded_tokens_are_counted(emb):
    before = _embedded(emb, TINY)
    r = post(emb, "/v1/embeddings", {"model": TINY, "input": ["count me", "and me too"]}).json()
    assert _embedded(emb, TINY) - before == r["usage"]["prompt_tokens"] > 0


BAD = [
    ({"model": PLAIN, "input": "hi"}, 400, "model", "embeddings_not_enabled"),
    ({"model": "no-such-model", "input": "hi"}, 404, "model", "model_not_found"),
    ({"model": GEMMA}, 400, "input", None),
    ({"model": GEMMA, "input": 42}, 400, "input", None),
    ({"model": GEMMA, "input": None}, 400, "input", None),
    ({"model": GEMMA, "input": []}, 400, "input", None),
    ({"model": GEMMA, "input": [[]]}, 400, "input", None),
    ({"model": GEMMA, "input": [2, -1]}, 400, "input", None),
    ({"model": GEMMA, "input": [2, 262144]}, 400, "input", None),  # Gemma 3's vocabulary: 262144
    ({"model": GEMMA, "input": [[2], [1 << 40]]}, 400, "input", None),
    ({"model": GEMMA, "input": ["a", [1]]}, 400, "input", None),
    ({"model": GEMMA, "input": "word " * (N_BATCH + 10)}, 400, "input", "context_length_exceeded"),
    ({"model": GEMMA, "input": "a\ud800b"}, 400, "input", None),
    ({"model": GEMMA, "input": "hi", "encoding_format": "int8"}, 400, "encoding_format", None),
    ({"model": GEMMA, "input": "hi", "dimensions": 0}, 400, "dimensions", None),
    ({"model": GEMMA, "input": "hi", "dimensions": 641}, 400, "dimensions", None),
]


@pytest.mark.parametrize("body, status, param, code", BAD)
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(emb, body, status, param, code):
    r = post(emb, "/v1/embeddings", body)
    assert_error(r, status, "invalid_request_error", param=param, **({"code": code} if code else {}))
    assert emb.proc.poll() is None
    assert len(vectors(emb, GEMMA, "still here")) == 1
    assert emb.get("/health").status_code == 200


def test_rerank_refuses_a_model_that_is_not_a_reranker(emb):
    r = post(emb, "/v1/rerank", {"model": GEMMA, "query": "capital of France", "documents": ["Paris", "Rome"]})
    assert_error(r, 400, "invalid_request_error", param="model", code="model_not_reranker")


def test_every_answer_is_signed_by_the_published_key(emb):
    pk = signing.public_key_from_b64(emb.get("/v1/keys").json()["public_key"])
    for path, body in (("/v1/embeddings", {"model": GEMMA, "input": ["naïve", "𓀀"]}),
                       ("/v1/embeddings", {"model": TINY, "input": [[1, 2, 3]], "encoding_format": "base64"}),
                       ("/v1/embeddings", {"model": PLAIN, "input": "x"}),
                       ("/v1/rerank", {"model": GEMMA, "query": "q", "documents": ["d"]})):
        raw = json.dumps(body).encode()
        r = requests.post(emb.url + path, data=raw, timeout=60,
                          headers={"Content-Type": "application/json", "Connection": "close"})
        v = signing.verify_response(pk, request=signing.RequestInfo("POST", path, raw), status=r.status_code,
                                    headers=dict(r.headers), body=r.content, max_age=MAX_AGE)
        assert v is not None and r.status_code in (200, 400)


# ---------------------------------------------------------------------------------------------
# References: llama-server --embeddings, and llama-cpp-python's high-level API


@pytest.mark.parametrize("model", [GEMMA, TINY])
def test_the_same_vectors_as_llama_server(emb, model, real_model, model_files, tmp_path):
    path = real_model if model == GEMMA else model_files.main
    # Our embedding context: mean pooling, one decode of at most n_batch tokens per input, no flash attention.
    args = ["--embeddings", "--pooling", "mean", "-fa", "off", "-t", "1", "-c", str(N_BATCH), "-b", str(N_BATCH),
            "-ub", str(N_BATCH), "-np", "1"]
    with llama_server(path, args, tmp_path) as url:
        ids = post(emb, "/tokenize", {"model": model, "content": TEXTS[1], "add_special": True}).json()["tokens"]
        worst = 1.0
        for inputs in (TEXTS, ids, [ids, ids[:5]]):
            theirs = requests.post(url + "/v1/embeddings", json={"input": inputs}, timeout=300)
            assert theirs.status_code == 200, theirs.text
            ref = [np.asarray(d["embedding"], dtype=np.float64) for d in sorted(theirs.json()["data"], key=lambda d: d["index"])]
            ours = vectors(emb, model, inputs)
            assert len(ours) == len(ref)
            for a, b in zip(ours, ref, strict=True):
                assert abs(np.linalg.norm(b) - 1) < 1e-4  # llama-server normalizes too
                worst = min(worst, cos(a, b))
        print(f"\n{model}: min cosine against llama-server {worst:.7f}")
        assert worst >= MIN_COSINE


_LLAMA_CPP_PYTHON = r"""
import json, sys
from appliance.engine.llama import backend_init
backend_init()  # our build loads its CPU backend as a module, as the server does
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                      n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, flash_attn=False, verbose=False)
print(json.dumps(llm.embed(json.loads(sys.stdin.read()), normalize=True)))
"""


def test_the_same_vectors_as_llama_cpp_pythons_embed(emb, real_model):
    # Texts without special tokens: its embed() tokenizes with BOS but does not read special tokens.
    texts = [t for t in TEXTS if t and "<" not in t]
    done = subprocess.run([sys.executable, "-c", _LLAMA_CPP_PYTHON, str(real_model)], input=json.dumps(texts),
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, f"reference run failed ({done.returncode}):\n{done.stderr[-3000:]}"
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    worst = min(cos(a, np.asarray(b)) for a, b in zip(vectors(emb, GEMMA, texts), theirs, strict=True))
    print(f"\nmin cosine against llama-cpp-python's embed(): {worst:.7f}")
    assert worst >= MIN_COSINE
