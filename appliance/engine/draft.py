"""Predicted Outputs: the client's guess of the answer, verified as a draft in the batch.

A request may carry a prediction (OpenAI's `prediction: {"type": "content", ...}`): text the answer
probably repeats, such as a file being edited. While the answer follows it, the scheduler appends the
next k predicted tokens to the sequence's one-token step and decodes them together; it then samples
position by position, exactly as without a draft, and keeps going while each sampled token equals the
predicted one (their KV and logits are then the right ones). The first token that differs is emitted
too; the cells decoded after it are removed. So every emitted token is drawn from the same
distribution, by the same sampler, in the same order as without a prediction: under greedy decoding
the text is the same, and with sampling (a seeded one too) the draws are. The draft only saves steps.

Whether to draft, and how much, is decided each step from what was measured: the acceptance so far
(every generated token is compared with the prediction, drafted or not) and the wall time of steps by
their token count. On a CPU a step of k + 1 tokens costs more than one of 1 (a matrix-vector product
becomes a GEMM), so a draft pays only when enough of it is expected to be kept; a useless prediction
soon stops being drafted.

Where the answer leaves the prediction (an edit), it is found again by the last few tokens generated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

__all__ = ["Prediction", "StepCosts", "draft_length", "expected_tokens", "DRAFT_CHOICES"]

DRAFT_CHOICES = (2, 4, 8, 12, 16, 24, 32)
"""Draft lengths considered each step (0, no draft, always is)."""
_RESYNC = 3
"""Tokens the answer must share with the prediction to be found in it again after an edit."""


class Prediction:
    """Where the answer stands in the predicted tokens, and how often it has followed them."""

    def __init__(self, tokens: Sequence[int], *, prior: float = 0.5) -> None:
        self.tokens = np.asarray(tokens, dtype=np.int32)
        self.pos: int | None = 0 if len(self.tokens) else None
        """Index of the predicted token expected next; None while the answer is off the prediction."""
        self.acceptance = prior
        """Moving average of how often a generated token was the predicted one at its place."""
        self._hit = np.zeros(len(self.tokens), dtype=bool)
        self.matched = 0
        """Predicted tokens the answer had at their place, each counted once however often the answer
        comes back to it (accepted_prediction_tokens: at most the prediction's length)."""
        self.drafted = 0
        """Predicted tokens decoded as drafts."""
        self.draft_kept = 0
        """Of those, the ones whose verification kept them."""
        self._recent: deque[int] = deque(maxlen=_RESYNC)

    def upcoming(self, k: int) -> list[int]:
        if self.pos is None or k <= 0:
            return []
        return [int(t) for t in self.tokens[self.pos : self.pos + k]]

    def left(self) -> int:
        """Predicted tokens after the current place (0 while the answer is off the prediction)."""
        return 0 if self.pos is None else max(0, len(self.tokens) - self.pos)

    def observe(self, token: int) -> bool:
        """Account one generated token; True when it was the predicted one."""
        self._recent.append(token)
        hit = self.pos is not None and self.pos < len(self.tokens) and int(self.tokens[self.pos]) == token
        # (a token generated while the answer is off the prediction counts as a miss too)
        self.acceptance = 0.9 * self.acceptance + (0.1 if hit else 0.0)
        if hit:
            pos = self.pos or 0
            if not self._hit[pos]:
                self._hit[pos] = True
                self.matched += 1
            self.pos = pos + 1
            return True
        self.pos = self._find_again()
        return False

    def _find_again(self) -> int | None:
        """The place after the first occurrence of the last few tokens in the prediction (searching
        from the current place first, then from the start), or None."""
        if len(self._recent) < _RESYNC:
            return None
        tail = np.asarray(self._recent, dtype=np.int32)
        n = len(self.tokens) - _RESYNC + 1
        if n <= 0:
            return None
        windows = np.lib.stride_tricks.sliding_window_view(self.tokens, _RESYNC)
        hits = np.flatnonzero((windows == tail).all(axis=1))
        if not hits.size:
            return None
        start = self.pos or 0
        after = hits[hits >= start - _RESYNC]
        i = int(after[0] if after.size else hits[0]) + _RESYNC
        return i if i < len(self.tokens) else None

    def rejected(self) -> int:
        """Predicted tokens that did not appear in the answer at their place (rejected_prediction_tokens)."""
        return max(0, len(self.tokens) - self.matched)


class StepCosts:
    """The wall time of a decode step by its token count (a moving average per count, up to `max_n`)."""

    def __init__(self, max_n: int = 64) -> None:
        self.max_n = max_n
        self._t = np.zeros(max_n + 1)

    def observe(self, n_tokens: int, seconds: float) -> None:
        if 0 < n_tokens <= self.max_n:
            old = self._t[n_tokens]
            self._t[n_tokens] = seconds if not old else 0.8 * old + 0.2 * seconds

    def known(self, n_tokens: int) -> bool:
        return 0 < n_tokens <= self.max_n and bool(self._t[n_tokens])

    def estimate(self, n_tokens: int) -> float | None:
        """The cost of a step of `n_tokens` tokens: measured, or interpolated between the nearest measured
        counts around it; None when nothing was measured at or above it (it must be tried first)."""
        if n_tokens > self.max_n:
            return None
        t = self._t
        if t[n_tokens]:
            return float(t[n_tokens])
        above = np.flatnonzero(t[n_tokens:]) + n_tokens
        below = np.flatnonzero(t[1:n_tokens]) + 1
        if not above.size:
            return None
        hi = int(above[0])
        if not below.size:
            return float(t[hi])
        lo = int(below[-1])
        return float(t[lo] + (t[hi] - t[lo]) * (n_tokens - lo) / (hi - lo))


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a step emits with k drafted, when each is kept with probability `acceptance` (independently):
    the sampled token plus the run of kept ones, 1 + a + a^2 + ... + a^k."""
    a = min(max(acceptance, 0.0), 0.999)
    return (1 - a ** (k + 1)) / (1 - a)


def draft_length(prediction: Prediction, costs: StepCosts, base_tokens: int, base_yield: float, room: int) -> int:
    """How many predicted tokens to draft for one sequence in a step that already holds `base_tokens`
    tokens expected to yield `base_yield` generated tokens: the k (0 included) with the most tokens per
    second of step, by the costs measured so far. A length whose cost was never measured is tried when
    the acceptance makes it look worth it (once measured, its real cost decides)."""
    room = min(room, prediction.left())
    base = costs.estimate(base_tokens)
    if room < DRAFT_CHOICES[0] or base is None:
        return 0
    best_k, best_rate = 0, base_yield / base
    for k in DRAFT_CHOICES:
        if k > room:
            break
        cost = costs.estimate(base_tokens + k)
        gain = expected_tokens(prediction.acceptance, k) - 1
        if cost is None:
            # Not measured yet: try it if it would pay at twice the cost of the base step.
            if (base_yield + gain) / (2 * base) > best_rate:
                return k
            break
        rate = (base_yield + gain) / cost
        if rate > best_rate:
            best_k, best_rate = k, rate
    return best_k
