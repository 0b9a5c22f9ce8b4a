"""What this process is: the digest clients pin (the frozen binary, or the installed package)."""

from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

from . import __version__

__all__ = ["binary_digest", "variant", "VERSION"]

VERSION = __version__


@lru_cache(maxsize=1)
def binary_digest() -> tuple[str, str]:
    """("frozen", SHA-256 of the executable) or ("package", SHA-256 over the source files)."""
    if getattr(sys, "frozen", False):
        h = hashlib.sha256()
        with open(sys.executable, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return "frozen", h.hexdigest()
    # A source install: every .py of the two packages, by relative path, in a fixed order.
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("appliance", "attestation"):
        for p in sorted((root / pkg).rglob("*.py")):
            rel = p.relative_to(root).as_posix().encode()
            h.update(len(rel).to_bytes(4, "big") + rel)
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return "package", h.hexdigest()


def variant() -> str:
    forced = os.environ.get("APPLIANCE_VARIANT")
    if forced in ("cpu", "cuda"):
        return forced
    try:
        import llama_cpp.llama_cpp as C

        return "cuda" if C.llama_supports_gpu_offload() else "cpu"
    except Exception:
        return "cpu"
