"""What a request asks the engine for, and the events that come back to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.engine.errors import EngineError
from appliance.engine.llama import SamplingParams

__all__ = [
    "GenerationRequest", "TokenLogprob", "Delta", "Usage", "PredictionUsage", "Timings", "Done", "Failed", "Event", "DeltaSink",
    "EngineObserver", "NullObserver", "Finished",
]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the chosen token's logprob plus the k most likely alternatives."""
    n_threads: int | None = None
    n_ctx: int | None = None
    """A per-request context cap (the original API's n_ctx), at most the slot's context."""
    stream: bool = True
    """False: the consumer wants the whole answer, so its greenlet is woken once, at the end, rather
    than for every token (each wake-up costs both threads CPU that the decode would otherwise get)."""
    prediction: tuple[int, ...] = ()
    """Predicted Outputs: tokens the answer probably repeats, drafted and verified (engine/draft.py);
    they never change what is generated, only how many steps it takes."""
    n: int = 1
    """Choices: n sequences admitted together (n slots, or none yet), the prompt decoded once and its KV
    copied to the others; choice i samples with seed + i. Each choice's events carry its index."""


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    bytes: tuple[int, ...]
    logprob: float
    top: tuple[tuple[str, tuple[int, ...], float], ...]


@dataclass(frozen=True)
class Delta:
    text: str
    n_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    index: int = 0
    """The choice it belongs to (0 to n - 1)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    prediction: PredictionUsage | None = None
    """Set when the request carried a prediction."""


@dataclass(frozen=True)
class PredictionUsage:
    accepted: int
    """Generated tokens that were the predicted token at their place (OpenAI's accepted_prediction_tokens)."""
    rejected: int
    """Predicted tokens that did not appear in the answer at their place (rejected_prediction_tokens)."""
    drafted: int
    """Predicted tokens decoded as drafts (llama-server's timings.draft_n)."""
    draft_kept: int
    """Of those, the ones verification kept (draft_n_accepted)."""


@dataclass(frozen=True)
class Timings:
    prompt_n: int
    prompt_ms: float
    predicted_n: int
    predicted_ms: float
    queued_ms: float

    @property
    def prompt_per_second(self) -> float:
        return self.prompt_n / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        return self.predicted_n / (self.predicted_ms / 1000) if self.predicted_ms > 0 else 0.0


@dataclass(frozen=True)
class Done:
    """One choice ended (a request of n choices gets n, the last one ending it). Each choice's usage
    counts the prompt, which was decoded once for them all: sum only completion tokens (`merged`)."""

    finish_reason: str
    usage: Usage
    timings: Timings
    index: int = 0

    @staticmethod
    def merged(dones: list[Done]) -> Done:
        """The request's totals over its choices' Done events: the prompt once (the first choice's,
        which decoded it), completion tokens summed, the last choice's finish reason and index."""
        first, last = dones[0], dones[-1]
        if len(dones) == 1:
            return first
        predicted = sum(d.usage.completion_tokens for d in dones)
        return Done(
            last.finish_reason,
            Usage(first.usage.prompt_tokens, predicted, first.usage.cached_tokens),
            Timings(
                prompt_n=first.timings.prompt_n,
                prompt_ms=first.timings.prompt_ms,
                predicted_n=predicted,
                predicted_ms=max(d.timings.predicted_ms for d in dones),
                queued_ms=first.timings.queued_ms,
            ),
            last.index,
        )


@dataclass(frozen=True)
class Failed:
    error: EngineError


Event = Delta | Done | Failed
DeltaSink = Callable[[Delta], bool]
"""Takes a streamed delta on the scheduler thread; returns whether to go on (see Generation.events)."""


@dataclass(frozen=True)
class Finished:
    """What the observer learns of a request that ended normally (stop or length), once per request:
    its times in seconds (queued: submission to a slot; e2e: submission to the last token; itl: the
    mean gap between its generated tokens, None with fewer than two) and its prompt's token counts."""

    queued: float
    e2e: float
    itl: float | None
    prompt: int
    cached: int


class EngineObserver(Protocol):
    def first_token(self, model: str, seconds: float) -> None: ...
    def tokens_generated(self, model: str, n: int) -> None: ...
    def prompt_tokens(self, model: str, n: int) -> None: ...
    def embedding_tokens(self, model: str, n: int) -> None: ...
    def request_finished(self, model: str, finished: Finished) -> None: ...


class NullObserver:
    def first_token(self, model: str, seconds: float) -> None:
        pass

    def tokens_generated(self, model: str, n: int) -> None:
        pass

    def prompt_tokens(self, model: str, n: int) -> None:
        pass

    def embedding_tokens(self, model: str, n: int) -> None:
        pass

    def request_finished(self, model: str, finished: Finished) -> None:
        pass
