"""Everything a client can be told, in the OpenAI error shape, and the one table that maps the
engine's and the trust layer's errors to it (`from_engine`, `from_trust`).

Each error carries the OpenAI error fields. A 500 never echoes the underlying exception: only
`ApiError` subclasses reach the wire with their message; anything else becomes `InternalError`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import Any, Literal, cast

import falcon

from appliance import conversations as stored
from appliance.engine import errors as engine
from appliance.trust import auth as trust

__all__ = [
    "ApiError",
    "BadRequest",
    "ContextLengthExceeded",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "ModelNotFound",
    "MethodNotAllowed",
    "Conflict",
    "PayloadTooLarge",
    "RequestTimeout",
    "UnsupportedMediaType",
    "RateLimited",
    "Overloaded",
    "NotReady",
    "UpgradeRequired",
    "InternalError",
    "ClientClosedRequest",
    "EngineFailure",
    "NoChatTemplate",
    "PromptParam",
    "GrammarParam",
    "from_engine",
    "from_trust",
    "from_store",
    "to_api_error",
    "retry_after",
    "handle_error",
]


class ApiError(Exception):
    """An error with a status and the OpenAI error body fields."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' does not exist or is not loaded", param="model")


class MethodNotAllowed(ApiError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RequestTimeout(ApiError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class Overloaded(ApiError):
    status = 503
    type = "server_error"
    code = "overloaded"


class UpgradeRequired(ApiError):
    """GET /v1/responses without a WebSocket upgrade (RFC 9110 §15.5.22)."""

    status = 426
    type = "invalid_request_error"
    code = "upgrade_required"


class NotReady(ApiError):
    status = 503
    type = "server_error"
    code = "not_ready"


class InternalError(ApiError):
    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(self, message: str = "The server had an error while processing your request") -> None:
        super().__init__(message)


class ClientClosedRequest(ApiError):
    """The client went away before its (non-streamed) answer was ready; the generation was cancelled.
    Nobody reads this answer: its status, nginx's 499, is for the access log and the metrics, which
    then tell a client's abort from a server error."""

    status = 499
    type = "client_closed_request"
    code = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("The client closed the connection before the answer was ready")


class EngineFailure(InternalError):
    """The inference engine failed; the message is generic, details go to the log only."""

    code = "engine_error"


class NoChatTemplate(BadRequest):
    code = "no_chat_template"


PromptParam = Literal["prompt", "messages", "input", "content", "tokens", "documents"]
"""The request field that holds a prompt: `prompt` (completions), `messages` (chat), `content`
(/tokenize), `tokens` (/detokenize), `input` (/v1/embeddings), `documents` (/v1/rerank)."""


GrammarParam = Literal["grammar", "json_schema", "response_format", "tools"]
"""The request field that constrains the output: `response_format` (OpenAI), `grammar` or
`json_schema` (llama-server), or `tools` (a chat that calls tools: their parameters' schemas)."""


def retry_after(seconds: float) -> dict[str, str]:
    """The Retry-After header for a wait of `seconds` (whole seconds, at least 1)."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def from_engine(
    e: engine.EngineError, *, prompt_param: PromptParam = "prompt", grammar_param: GrammarParam = "grammar"
) -> ApiError:
    """The one table from engine errors to the wire. `prompt_param`: the field a prompt error names;
    `grammar_param`: the field that gave a refused grammar or schema."""
    match e:
        case engine.ShuttingDown():
            return Overloaded(e.message, code="shutting_down", headers=retry_after(e.retry_after))
        case engine.QueueFull() | engine.Busy():
            return Overloaded(e.message, headers=retry_after(e.retry_after))
        case engine.PromptTooLong():
            return ContextLengthExceeded(e.message, param=prompt_param)
        case engine.NoChatTemplate():
            return NoChatTemplate(e.message, param="model")
        case engine.InvalidPrompt():
            return BadRequest(f"{prompt_param}: {e.message}", param=prompt_param)
        case engine.InvalidGrammar(subject="schema"):
            return BadRequest(f"{grammar_param}: unsupported JSON schema: {e.message}", param=grammar_param)
        case engine.InvalidGrammar():
            return BadRequest(f"{grammar_param}: invalid GBNF grammar: {e.message}", param=grammar_param)
        case engine.InvalidLogitBias():
            return BadRequest(f"logit_bias: {e.message}", param="logit_bias")
        case engine.NoAllowedToken():
            return BadRequest(e.message, code="grammar_dead_end")
        case engine.TooManyChoices():
            return BadRequest(f"n: {e.message}", param="n")
        case engine.InfillNotSupported():
            return BadRequest(f"suffix: {e.message}", param="suffix", code="fim_not_supported")
        case engine.InputTooLong():
            return ContextLengthExceeded(f"input: {e.message}", param="input")
        case engine.EmbeddingsDisabled():
            return BadRequest(e.message, param="model", code="embeddings_not_enabled")
        case engine.NotReranker():
            return BadRequest(e.message, param="model", code="model_not_reranker")
        case engine.UnknownModel():
            return ModelNotFound(e.name)
        case engine.ModelNotReady():
            return NotReady(e.message, headers=retry_after(e.retry_after))
        case engine.Conflict():
            return Conflict(e.message, param="model_name")
        case engine.LoadRefused(subject="use_mmap"):
            return BadRequest(e.message, param="use_mmap")
        case engine.LoadRefused(subject="sha256"):
            return BadRequest(e.message, param="sha256", code="digest_mismatch")
        case engine.LoadRefused(subject="n_ctx"):
            return BadRequest(e.message, param="n_ctx", code="insufficient_memory")
        case engine.LoadRefused(forbidden=True):
            return Forbidden(f"model_path: {e.message}", param="model_path")
        case engine.LoadRefused():
            return BadRequest(f"model_path: {e.message}", param="model_path")
        case _:  # EngineCrashed, and any engine error this table has not learnt yet
            return EngineFailure()


def from_trust(e: trust.AuthError) -> ApiError:
    """The trust layer's refusals on the wire."""
    match e:
        case trust.TooManyRequests():
            return RateLimited(e.message, headers=retry_after(e.retry_after))
        case trust.ReplayCacheFull():
            return Overloaded(e.message, headers=retry_after(e.retry_after))
        case trust.NotPermitted():
            return Forbidden(e.message)
        case _:
            return Unauthorized(e.message)


def from_store(e: stored.RecordNotFound | stored.RecordTooLarge, *, param: str | None = None) -> ApiError:
    """The conversation store's refusals on the wire. `param`: the request field that named the record
    (`previous_response_id` gets OpenAI's own code); None where the URL named it."""
    match e:
        case stored.RecordNotFound() if param == "previous_response_id":
            return NotFound(f"Previous response with id '{e.record_id[:80]}' not found.", param=param,
                            code="previous_response_not_found")
        case stored.RecordNotFound():
            return NotFound(f"No {e.kind} found with id '{e.record_id[:80]}'.", param=param)
        case _:
            return BadRequest(f"The {e.kind} would take {e.size} bytes sealed; the store holds at most "
                              f"{e.budget} (conversations.memory_budget_bytes)", param=param, code="too_large")


def to_api_error(e: Exception, *, prompt_param: PromptParam = "prompt") -> ApiError | None:
    """An ApiError as it is, engine and trust errors through their tables; None for anything else (a
    bug: a 500)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, engine.EngineError):
        return from_engine(e, prompt_param=prompt_param)
    if isinstance(e, trust.AuthError):
        return from_trust(e)
    if isinstance(e, stored.RecordNotFound | stored.RecordTooLarge):
        return from_store(e)
    return None


log = logging.getLogger("appliance.http")


def send_error(resp: falcon.Response, err: ApiError) -> None:
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(err.body())
    for k, v in err.headers.items():
        resp.set_header(k, v)


def handle_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params: object) -> None:
    """Falcon's handler for every exception: each leaves in the OpenAI shape, a 500 without details."""
    err = to_api_error(ex, prompt_param=getattr(req.context, "prompt_param", "prompt")) or _framework_error(req, ex)
    send_error(resp, err)


def _framework_error(req: falcon.Request, ex: Exception) -> ApiError:
    if isinstance(ex, falcon.HTTPRouteNotFound | falcon.HTTPNotFound):
        return NotFound(f"No route {req.method} {req.path}")
    if isinstance(ex, falcon.HTTPMethodNotAllowed):
        err = MethodNotAllowed(f"Method {req.method} is not allowed on {req.path}")
        # falcon builds HTTPMethodNotAllowed's headers as a dict (with Allow in it)
        allow = cast("Mapping[str, str]", ex.headers).get("Allow") if ex.headers else None
        if allow:
            err.headers["Allow"] = allow
        return err
    if isinstance(ex, falcon.HTTPError):
        http_err = ApiError(ex.title or "Request error", headers=dict(ex.headers or {}))
        http_err.status = ex.status_code
        http_err.type = "invalid_request_error" if ex.status_code < 500 else "server_error"
        return http_err
    log.error("unhandled %s on %s", type(ex).__name__, req.uri_template or "unmatched", exc_info=ex)
    return InternalError()
