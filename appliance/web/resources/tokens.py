"""Tokens without generating: llama-server's /tokenize and /detokenize, and the input-token count of
a completion or chat request (the shape of OpenAI's /v1/responses/input_tokens).

Tokenizing is a llama.cpp call, so it runs in the hub's thread pool (the registry hands it over), never
on the event loop. A count goes through the very path a completion or chat takes to its prompt
(template, BOS rule, tokenizing), so it is exactly the `usage.prompt_tokens` that request would report.
"""

from __future__ import annotations

import falcon

from appliance.engine.registry import ModelRegistry
from appliance.web.errors import NotFound
from appliance.web.resources.inference import chat_messages, prompt_source
from appliance.web.schemas import ChatTokensRequest, CompletionTokensRequest, DetokenizeRequest, TokenizeRequest, parse

__all__ = ["Tokens"]


class Tokens:
    def __init__(self, models: ModelRegistry, default_max_tokens: int = 16) -> None:
        self.default_max_tokens = default_max_tokens
        self.models = models

    def on_post_tokenize(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "content"
        body = parse(TokenizeRequest, req.context.json)
        name = self._model(body.model)
        ids = self.models.tokenize(name, body.content, add_special=body.add_special, parse_special=body.parse_special)
        if not body.with_pieces:
            resp.media = {"tokens": ids}
            return
        pieces = self.models.pieces(name, ids)
        resp.media = {"tokens": [{"id": t, "piece": shown(p)} for t, p in zip(ids, pieces, strict=True)]}

    def on_post_detokenize(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "tokens"
        body = parse(DetokenizeRequest, req.context.json)
        pieces = self.models.pieces(self._model(body.model), body.tokens)
        resp.media = {"content": b"".join(pieces).decode("utf-8", "replace")}

    def on_post_completion_input_tokens(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "prompt"
        body = parse(CompletionTokensRequest, req.context.json)
        if body.suffix is not None:  # as the completion lays out a fill-in-the-middle prompt
            limit = body.max_tokens if body.max_tokens is not None else self.default_max_tokens
            _engine, prompt = self.models.infill_prompt(body.model, prompt_source(body.prompt), body.suffix,
                                                        n_predict=limit)
        else:
            _engine, prompt = self.models.text_prompt(body.model, prompt_source(body.prompt))
        resp.media = {"object": "response.input_tokens", "input_tokens": len(prompt)}

    def on_post_chat_input_tokens(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.prompt_param = "messages"
        body = parse(ChatTokensRequest, req.context.json)
        _engine, prompt = self.models.chat_prompt(body.model, chat_messages(body.messages))
        resp.media = {"object": "response.input_tokens", "input_tokens": len(prompt)}

    def _model(self, name: str | None) -> str:
        """The model a request names, or, where it names none (llama-server's clients send none), the
        one model that is ready."""
        if name is not None:
            return name
        ready = [r.name for r in self.models.records() if r.state == "ready"]
        if len(ready) != 1:
            # A 404 (no model to use), like a named model that is not loaded: the body was valid, and which
            # model it meant depends on what is loaded now (schemathesis found the 400 contradicting the spec).
            raise NotFound(f"No model named, and {len(ready)} are ready: name one in 'model'", param="model",
                           code="model_not_found")
        return ready[0]


def shown(piece: bytes) -> str | list[int]:
    """A piece as llama-server shows it: text where its bytes are valid UTF-8, else the byte values
    (a token may hold part of a character)."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
