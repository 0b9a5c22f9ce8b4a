"""Server-side state of the Responses and Conversations APIs: sealed records, owned by an API key.

Knows neither HTTP nor the engine: the web layer (web/resources/responses.py) decides what a record
holds; this package keeps it sealed (sealing.py) and bounded (store.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.conversations.sealing import SealingKey, Signer, TeeSealingSource, Unsealable, boot_key
from appliance.conversations.store import (
    KINDS,
    ConversationStore,
    LoadReport,
    RecordNotFound,
    RecordTooLarge,
    StoreLimits,
)
from appliance.settings import ConversationSettings

__all__ = [
    "SealingKey", "Signer", "TeeSealingSource", "Unsealable", "boot_key",
    "ConversationStore", "StoreLimits", "RecordNotFound", "RecordTooLarge", "LoadReport", "KINDS", "open_store",
]


def open_store(
    settings: ConversationSettings,
    key: SealingKey,
    *,
    clock: Callable[[], float] = time.time,
    run_blocking: Callable[[Callable[[], None]], None] = lambda write: write(),
) -> ConversationStore:
    """The store `[conversations]` describes, with what its directory holds already loaded. `run_blocking`
    runs its disk writes (off the event loop in a worker: osthreads.off_loop)."""
    limits = StoreLimits(
        max_responses=settings.max_responses,
        max_conversations=settings.max_conversations,
        ttl_seconds=float(settings.ttl_seconds),
        memory_budget_bytes=settings.memory_budget_bytes,
    )
    store = ConversationStore(key, limits, clock=clock, directory=settings.directory, run_blocking=run_blocking)
    store.load()
    return store
