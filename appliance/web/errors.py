"""One exception tree for everything a client can be told, mapped to HTTP in one place (app.py).

Each error carries the OpenAI error fields. A 500 never echoes the underlying exception: only
`ApiError` subclasses reach the wire with their message; anything else becomes `InternalError`.
"""

from __future__ import annotations

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
    "UnsupportedMediaType",
    "RateLimited",
    "Overloaded",
    "NotReady",
    "InternalError",
    "EngineFailure",
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

    def body(self) -> dict:
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


class EngineFailure(InternalError):
    """The inference engine failed; the message is generic, details go to the log only."""

    code = "engine_error"
