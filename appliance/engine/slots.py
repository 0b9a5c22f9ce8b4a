"""A scheduler's per-sequence state, and the small decisions made about it each step."""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from appliance.engine.draft import Prediction
from appliance.engine.events import GenerationRequest, TokenLogprob
from appliance.engine.llama import SamplerChain
from appliance.engine.mailbox import Generation

__all__ = ["Slot", "ActiveSlot", "PairCost", "MIN_REUSE", "runs", "worth_taking", "common_prefix", "scan_stops"]

MIN_REUSE = 16
"""Cached tokens worth keeping: a prefix this long is reused (and copied to another slot if need be);
a shorter one only when the prompt continues the whole cached sequence."""


@dataclass
class Slot:
    seq: int
    kv: list[int] = field(default_factory=list)
    """Tokens in this sequence's KV cache, positions 0..len-1 (kept after a request for prefix reuse)."""
    last_used: float = 0.0
    gen: Generation | None = None
    req: GenerationRequest | None = None
    sampler: SamplerChain | None = None
    pending: list[int] = field(default_factory=list)
    """Prompt tokens not yet decoded."""
    limit: int = 0
    cached: int = 0
    n_generated: int = 0
    last_token: int = -1
    text: str = ""
    emitted: int = 0
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder | None = None
    t_queued: float = 0.0
    t_admitted: float = 0.0
    t_first: float = 0.0
    batch_index: int = -1
    n_batch_tokens: int = 0
    index: int = 0
    """Which of its request's choices this slot generates."""
    leader: Slot | None = None
    """Set while this slot waits for another choice's slot to decode the shared prompt."""
    followers: list[Slot] = field(default_factory=list)
    """The slots waiting for this one's prompt (its KV is copied to them once it is decoded)."""
    prediction: Prediction | None = None
    """The request's predicted output, followed as the answer is generated (Predicted Outputs)."""
    draft: list[int] = field(default_factory=list)
    """Predicted tokens decoded in this step after the sequence's own token, to verify."""
    draft_index: int = -1
    """The batch index of the first drafted token (the rest follow it)."""


if TYPE_CHECKING:

    class ActiveSlot(Slot):
        """A slot serving a request (the scheduler's `_active`): admission sets these before the slot
        joins, and they stay set until it is released. For the type checker only (at run time it is
        Slot), so the per-token path reads them without a check."""

        gen: Generation
        req: GenerationRequest
        sampler: SamplerChain
        decoder: codecs.IncrementalDecoder

else:
    ActiveSlot = Slot


class PairCost:
    """Whether two generating sequences decode faster as two one-token passes than as one two-token pass.

    It depends on the kernels: llama.cpp's x86 CPU path for Q8_0 weights takes a matrix-vector
    product for one token and a tiled GEMM from two on, and here a two-token step took 21.5 ms
    against 10.3 for one, so two passes win; on a GPU one pass costs about what a one-token one does.
    So both are timed as they happen (an exponential average of llama_decode's wall time) and the
    cheaper is taken; every _PROBE-th pair step goes the other way, so that estimate stays current.
    """

    _PROBE = 32
    _MARGIN = 0.97  # split only for a clear gain: the two passes must beat 97% of one pair pass

    def __init__(self) -> None:
        self.one = 0.0
        self.pair = 0.0
        self._steps = 0

    def observe(self, n_tokens: int, seconds: float) -> None:
        if n_tokens == 1:
            self.one = seconds if not self.one else 0.8 * self.one + 0.2 * seconds
        elif n_tokens == 2:
            self.pair = seconds if not self.pair else 0.8 * self.pair + 0.2 * seconds

    def split(self) -> bool:
        """Called once per step with exactly two generating sequences and nothing to prefill."""
        self._steps += 1
        if not self.pair:
            return False  # time one pair pass first
        better = bool(self.one) and 2 * self.one < self._MARGIN * self.pair
        return not better if self._steps % self._PROBE == 0 else better


def runs(seqs: set[int]) -> int:
    """How many runs of consecutive ids a set of sequence ids makes ({0, 1, 3} -> 2)."""
    return sum(1 for i in seqs if i - 1 not in seqs)


def worth_taking(shared: int, n_cached: int, n_prompt: int) -> int:
    """A slot's shared prefix as a reason to take that slot: 0 when it is only a short shared head.

    The BOS token or a chat template's opening is common to unrelated prompts: taking a slot for
    that would throw away its cache (another client's conversation) for nothing.
    """
    return shared if shared >= MIN_REUSE or (shared and shared in (n_cached, n_prompt)) else 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], dtype=np.int32) != np.asarray(b[:n], dtype=np.int32))
    return int(diff[0]) if diff.size else n


def scan_stops(text: str, emitted: int, stops: tuple[str, ...]) -> tuple[int | None, int]:
    """(index where the first stop string starts, or None; how far the text is safe to emit).

    Text that could be the start of a stop string is held back until it can no longer match.
    """
    longest = max(len(x) for x in stops)
    start = max(0, emitted - longest + 1)
    cut = None
    for stop in stops:
        i = text.find(stop, start)
        if i != -1 and (cut is None or i < cut):
            cut = i
    if cut is not None:
        return cut, cut
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return None, max(emitted, len(text) - hold)
