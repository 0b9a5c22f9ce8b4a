"""OpenAI's /v1/embeddings, and llama-server's (Jina's, Cohere's) /v1/rerank.

Texts are tokenized in the hub's thread pool; the model's embedder thread pools and normalizes the
vectors, batching this request's inputs with those of any other request waiting. Only this greenlet
waits meanwhile. A vector never reaches a log.
"""

from __future__ import annotations

import base64

import falcon
import numpy as np

from appliance.engine.embedder import l2_normalized
from appliance.engine.errors import NotReranker
from appliance.engine.registry import ModelRegistry
from appliance.web.errors import BadRequest
from appliance.web.schemas import EmbeddingRequest, RerankRequest, parse

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
        vectors = embedder.submit(inputs).wait()
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
        self.models.get(body.model)  # an unknown model is a 404 first
        # Reranking needs a reranker (llama.cpp pooling rank, a classification head); none is served yet.
        raise NotReranker(body.model)


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
