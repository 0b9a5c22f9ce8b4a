"""OpenAI's /v1/embeddings, and llama-server's (Jina's, Cohere's) /v1/rerank.

Texts are tokenized in the hub's thread pool; the model's embedder thread pools and normalizes the
vectors, batching this request's inputs with those of any other request waiting. Only this greenlet
waits meanwhile. A vector never reaches a log.

A rerank runs the same way on a reranker's embedder: one input per document (the query and the
document, laid out as llama-server lays them out), whose first output is the document's relevance
score; the answer is llama-server's, best first.
"""

from __future__ import annotations

import base64

import falcon
import numpy as np

from appliance.engine.embedder import ClientGone, EmbeddingJob, l2_normalized
from appliance.engine.errors import EmbeddingsDisabled, NotReranker
from appliance.engine.registry import ModelRegistry
from appliance.osthreads import off_loop
from appliance.web.errors import BadRequest, ClientClosedRequest, ContextLengthExceeded
from appliance.web.schemas import EmbeddingRequest, RerankRequest, parse
from appliance.web.streams import watch_disconnect

__all__ = ["Embeddings"]


class Embeddings:
    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "input"
        body = parse(EmbeddingRequest, req.context.json)
        embedder, inputs = self.models.embedding_inputs(body.model, body.inputs())
        size = embedder.dimensions
        if body.dimensions is not None and body.dimensions > size:
            raise BadRequest(f"dimensions: this model's embeddings have {size} dimensions; at most that many can be "
                             "asked for", param="dimensions")
        vectors = _wait(embedder.submit(inputs), req)
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(_shortened(v, body.dimensions), body.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        n = sum(len(t) for t in inputs)
        resp.media = {"object": "list", "data": data, "model": body.model,
                      "usage": {"prompt_tokens": n, "total_tokens": n}}

    def on_post_rerank(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "documents"
        body = parse(RerankRequest, req.context.json)
        try:
            reranker = self.models.embedder(body.model)  # an unknown model is a 404 first
        except EmbeddingsDisabled:
            raise NotReranker(body.model) from None
        if reranker.pooling != "rank":  # an embedding model: its output is a vector, not a score
            raise NotReranker(body.model)
        if not _utf8(body.query):
            raise BadRequest("query: text must be valid Unicode: a lone surrogate (\\ud800-\\udfff) has no UTF-8 "
                             "form", param="query")
        pairs = off_loop(reranker.rerank_inputs, body.query, body.documents)
        limit = reranker.n_tokens
        for i, tokens in enumerate(pairs):
            if len(tokens) > limit:
                alone = len(off_loop(reranker.rerank_inputs, body.query, [""])[0])
                if alone > limit:
                    raise ContextLengthExceeded(
                        f"query: the query alone makes {alone} tokens of a query-document pair; this model reranks "
                        f"at most {limit} tokens per pair (its n_batch setting, within its trained context)", param="query")
                raise ContextLengthExceeded(
                    f"documents: document {i} with the query makes {len(tokens)} tokens; this model reranks at most "
                    f"{limit} tokens per query-document pair (its n_batch setting, within its trained context)",
                    param="documents")
        scores = [float(out[0]) for out in _wait(reranker.submit(pairs), req)]
        best = sorted(range(len(scores)), key=lambda i: -scores[i])[: body.top_n]  # ties: in document order
        results = [
            {"index": i, "relevance_score": scores[i],
             **({"document": {"text": body.documents[i]}} if body.return_documents else {})}
            for i in best
        ]
        n = sum(len(t) for t in pairs)
        resp.media = {"model": body.model, "object": "list", "usage": {"prompt_tokens": n, "total_tokens": n},
                      "results": results}


def _utf8(text: str) -> bool:
    """Whether the text has a UTF-8 form (JSON can spell a lone surrogate, which Python keeps)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _wait(job: EmbeddingJob, req: falcon.Request) -> list[np.ndarray]:
    """The job's vectors; when the client closes its connection first, the job is cancelled (its inputs
    not yet decoded are skipped) and the answer is a 499 nobody reads."""
    watcher = watch_disconnect(req.env.get("gunicorn.socket"), job)
    try:
        return job.wait()
    except ClientGone:
        raise ClientClosedRequest() from None
    finally:
        if watcher is not None:
            watcher.kill(block=False)


def _shortened(v: np.ndarray, dimensions: int | None) -> np.ndarray:
    """The first `dimensions` components, normalized again (a Matryoshka truncation: meaningful only for
    a model trained for it, which the client knows and the GGUF does not say)."""
    if dimensions is None or dimensions >= len(v):
        return v
    return l2_normalized(v[:dimensions])


def _encoded(v: np.ndarray, encoding: str) -> list[float] | str:
    """A vector as OpenAI sends it: a list of floats, or base64 of its little-endian float32 bytes."""
    if encoding == "base64":
        return base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
    out: list[float] = v.astype(np.float32).tolist()
    return out
