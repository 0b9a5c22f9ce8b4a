"""Runtime measurements: what the appliance extends at model load, and how a verifier replays it.

Each loaded model extends one register (TDX RTMR3, Nitro PCR16) with

    event_digest = SHA-384(b"appliance-measurement-v1\\x00" || canonical {"event","name","sha256"})
    register'    = SHA-384(register || event_digest)          (both TDX RTMR and Nitro PCR rules)

starting from 48 zero bytes. The served event log lists each event's description; the verifier
recomputes every digest, replays the log and compares with the register in the evidence.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["MEASUREMENT_DOMAIN", "model_event", "event_digest", "replay", "ReplayError"]

MEASUREMENT_DOMAIN = b"appliance-measurement-v1\x00"
_ZERO = bytes(48)


class ReplayError(ValueError):
    pass


def model_event(name: str, sha256_hex: str) -> dict[str, Any]:
    return {"event": "model-load", "name": name, "sha256": sha256_hex}


def event_digest(event: dict[str, Any]) -> bytes:
    desc = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return hashlib.sha384(MEASUREMENT_DOMAIN + desc).digest()


def replay(events: Sequence[object], initial: bytes = _ZERO) -> bytes:
    """The register value after extending every event's digest in order."""
    value = initial
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or ev.get("event") != "model-load":
            raise ReplayError(f"event log: entry {i} is not a model-load event")
        value = hashlib.sha384(value + event_digest(ev)).digest()
    return value
