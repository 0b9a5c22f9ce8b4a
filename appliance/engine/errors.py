"""What the engine can refuse or fail with, in the engine's own words: no statuses, no wire fields.

The web package maps each class to the wire in one table (`appliance.web.errors.from_engine`): the
HTTP status, the OpenAI error type and code, the request field to name (`messages` for a chat,
`prompt` for a completion) and any retry hint as a header.
"""

from __future__ import annotations

from typing import Literal

__all__ = [
    "EngineError",
    "Busy",
    "ShuttingDown",
    "QueueFull",
    "PromptTooLong",
    "InvalidPrompt",
    "NoChatTemplate",
    "InvalidGrammar",
    "InvalidLogitBias",
    "NoAllowedToken",
    "TooManyChoices",
    "InfillNotSupported",
    "InputTooLong",
    "EmbeddingsDisabled",
    "NotReranker",
    "ModelUnavailable",
    "UnknownModel",
    "ModelNotReady",
    "Conflict",
    "LoadRefused",
    "EngineCrashed",
]

# What a grammar refusal is about: a GBNF grammar as given, or a JSON schema (compiled to one).
GrammarSubject = Literal["grammar", "schema"]

# What a load refusal is about: the model's file (its path, contents or digest), or its use_mmap setting.
LoadSubject = Literal["path", "use_mmap", "n_ctx", "sha256"]


class EngineError(Exception):
    """Every refusal and failure the engine reports; `message` is safe to show a client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Busy(EngineError):
    """No room right now (the model's queue, or its KV cache); worth retrying after `retry_after` s."""

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Busy):
    """The server is stopping and its drain time is nearly spent: what had not finished ends with this,
    cleanly, rather than being cut off when the worker exits. Another replica can take the retry."""

    def __init__(self) -> None:
        super().__init__("The server is shutting down: retry the request", retry_after=1.0)


class QueueFull(Busy):
    def __init__(self, model: str, waiting: int, *, retry_after: float = 1.0) -> None:
        super().__init__(f"Model '{model}' has {waiting} requests waiting; try again shortly", retry_after=retry_after)
        self.model = model
        self.waiting = waiting


class PromptTooLong(EngineError):
    """The prompt leaves no room for a completion in its context (the model's, or the request's n_ctx)."""

    def __init__(self, *, limit: int, length: int, request_limit: bool) -> None:
        whose = "This request's context (n_ctx)" if request_limit else "This model's context"
        super().__init__(f"{whose} is {limit} tokens; the prompt has {length} tokens and leaves no room for a completion")
        self.limit = limit
        self.length = length


class InvalidPrompt(EngineError):
    """The prompt cannot be turned into tokens: a template refused the messages, an id is out of range."""


class NoChatTemplate(InvalidPrompt):
    """The model has no chat template and none is configured (chat needs one; completions do not)."""


class InvalidGrammar(EngineError):
    """A grammar or JSON schema that cannot constrain generation; `message` says why (it names the
    keyword or the place in the grammar) without the grammar's own text."""

    def __init__(self, message: str, *, subject: GrammarSubject) -> None:
        super().__init__(message)
        self.subject = subject


class InvalidLogitBias(EngineError):
    """A logit bias for a token id outside the model's vocabulary."""


class NoAllowedToken(EngineError):
    """Mid-generation: the grammar allows no token this model can produce (say, a character none of
    its tokens spells)."""

    def __init__(self) -> None:
        super().__init__("The grammar allows no token of this model's vocabulary at this point of the output")


class TooManyChoices(EngineError):
    """A request for more choices (n) than the model has slots: they are decoded side by side."""

    def __init__(self, n: int, slots: int) -> None:
        super().__init__(f"this model decodes at most {slots} choices at once (its parallel slots); {n} were asked for")
        self.slots = slots


class InfillNotSupported(EngineError):
    """A fill-in-the-middle request (a suffix) for a model whose vocabulary has no FIM tokens."""

    def __init__(self) -> None:
        super().__init__("this model has no fill-in-the-middle tokens (FIM prefix, suffix and middle)")


class InputTooLong(EngineError):
    """An embedding input longer than one decode of the model's embedding context holds (llama.cpp
    pools a sequence over one ubatch)."""

    def __init__(self, *, index: int, length: int, limit: int) -> None:
        super().__init__(f"input {index} has {length} tokens; this model embeds at most {limit} tokens per input "
                         "(its n_batch setting)")
        self.index = index
        self.length = length
        self.limit = limit


class EmbeddingsDisabled(EngineError):
    """Embeddings asked of a model that does not serve them (its `embeddings` setting is off, or it is a
    reranker, whose output is a score)."""

    def __init__(self, name: str, *, reranker: bool = False) -> None:
        if reranker:
            super().__init__(f"The model '{name}' is a reranker (pooling rank): it serves POST /v1/rerank, "
                             "not embeddings")
        else:
            super().__init__(f"The model '{name}' does not serve embeddings: load it with embeddings = true "
                             "(its configuration, or \"embeddings\": true in POST /load_model)")
        self.name = name


class NotReranker(EngineError):
    """Reranking asked of a model that is not a reranker (pooling `rank`, with a classification head)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"The model '{name}' is not a reranker: /v1/rerank needs a reranking model (llama.cpp "
                         "pooling type rank, with a classification head: its GGUF's pooling type, or "
                         "pooling = \"rank\" in its settings)")
        self.name = name


class ModelUnavailable(EngineError):
    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class UnknownModel(ModelUnavailable):
    """Not loaded (never, failed, or being unloaded)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"The model '{name}' does not exist or is not loaded")


class ModelNotReady(ModelUnavailable):
    """Known, but not serving yet (loading); worth retrying."""

    def __init__(self, name: str, state: str) -> None:
        super().__init__(name, f"The model '{name}' is {state}")
        self.state = state
        self.retry_after = 1.0


class Conflict(EngineError):
    """A change that clashes with the current state (a name already in use, a model still loading)."""


class LoadRefused(EngineError):
    """A model the engine will not load; `forbidden`: by policy (not a bad file)."""

    def __init__(self, message: str, *, subject: LoadSubject = "path", forbidden: bool = False) -> None:
        super().__init__(message)
        self.subject = subject
        self.forbidden = forbidden


class EngineCrashed(EngineError):
    """llama.cpp failed under a request; details go to the log, never to the client."""

    def __init__(self, message: str = "The server had an error while processing your request") -> None:
        super().__init__(message)
