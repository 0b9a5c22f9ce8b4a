"""KV kept in host memory after its slot went to another request: the next turn of a conversation.

A slot keeps its tokens' KV after a request, so the next request that starts with them (a chat's next
turn) decodes only what is new. But with more conversations than slots, the slot has usually gone to
another conversation by then. So before a slot's cells are dropped, the scheduler copies them out
(llama_state_seq_get_data) into this cache, keyed by their tokens; when a prompt shares a long enough
prefix with an entry, they are copied back into a slot (llama_state_seq_set_data) and only the rest of
the prompt is decoded. Copying a sequence's cells costs about a memcpy of them (18 KiB per token for
Gemma 3 270M), far less than decoding them again.

Bounded in bytes (the model's `cache_ram_mib`), least recently used out first. An entry whose tokens
begin another entry's is dropped: the longer one serves every prompt the shorter one would. Entries
live in this worker's memory only and die with it (nothing is written to disk). Touched by the
scheduler thread only.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from appliance.engine.llama import SeqState

__all__ = ["HostCache", "Saved"]


@dataclass(frozen=True, eq=False)
class Saved:
    tokens: np.ndarray  # int32: the sequence's tokens, positions 0..n-1
    state: SeqState

    @property
    def nbytes(self) -> int:
        return len(self.state) + self.tokens.nbytes


class HostCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.used = 0
        self._entries: OrderedDict[int, Saved] = OrderedDict()  # id(entry) -> entry, oldest first
        self.saved = 0
        """Entries put (a slot's cells copied out)."""
        self.restored = 0
        """Entries taken back into a slot."""
        self.evicted = 0
        """Entries dropped for room (the least recently used)."""

    def __len__(self) -> int:
        return len(self._entries)

    def best(self, prompt: Sequence[int]) -> tuple[Saved | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length (0: none)."""
        if not self._entries or not prompt:
            return None, 0
        p = np.asarray(prompt, dtype=np.int32)
        found: Saved | None = None
        longest = 0
        for e in self._entries.values():
            n = min(len(p), len(e.tokens))
            if n <= longest or e.tokens[0] != p[0]:
                continue
            diff = np.flatnonzero(e.tokens[:n] != p[:n])
            shared = int(diff[0]) if diff.size else n
            if shared > longest:
                found, longest = e, shared
        return found, longest

    def holds(self, tokens: Sequence[int]) -> bool:
        """Whether an entry already starts with `tokens` (saving them again would add nothing)."""
        t = np.asarray(tokens, dtype=np.int32)
        return any(len(e.tokens) >= len(t) and np.array_equal(e.tokens[: len(t)], t) for e in self._entries.values())

    def put(self, tokens: Sequence[int], state: SeqState) -> bool:
        """Keep `state` (the cells of `tokens`); False when one entry alone would exceed the budget."""
        entry = Saved(np.asarray(tokens, dtype=np.int32).copy(), state)
        if entry.nbytes > self.budget:
            return False
        for key, e in list(self._entries.items()):  # entries the new one extends add nothing now
            if len(e.tokens) <= len(entry.tokens) and np.array_equal(entry.tokens[: len(e.tokens)], e.tokens):
                self._drop(key)
        while self._entries and self.used + entry.nbytes > self.budget:
            self._drop(next(iter(self._entries)))
            self.evicted += 1
        self._entries[id(entry)] = entry
        self.used += entry.nbytes
        self.saved += 1
        return True

    def take(self, entry: Saved) -> None:
        """Remove `entry`: its cells are back in a slot (which saves them again, longer, when it is
        reassigned)."""
        if id(entry) in self._entries:
            self._drop(id(entry))
            self.restored += 1

    def clear(self) -> None:
        self._entries.clear()
        self.used = 0

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.used -= e.nbytes
