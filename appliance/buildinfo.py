"""What this process is: the digest clients pin (the frozen binary, or the installed package)."""

from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

from appliance import __version__
from appliance.digests import file_sha256

__all__ = ["binary_digest", "variant", "verify_bundle", "VERSION"]

VERSION = __version__


@lru_cache(maxsize=1)
def binary_digest() -> tuple[str, str]:
    """("frozen", SHA-256 of the executable) or ("package", SHA-256 over the source files)."""
    if getattr(sys, "frozen", False):
        # /proc/self/exe is the file this process was executed from, even if its path has since been
        # renamed over or removed; and a file being executed cannot be written (ETXTBSY). So these are
        # the bytes running, as long as this runs at startup (the server calls it in the master).
        exe = "/proc/self/exe" if os.path.exists("/proc/self/exe") else sys.executable
        return "frozen", file_sha256(exe)
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


def verify_bundle(prefix: str = "") -> int:
    """The frozen binary: check the files its bootloader extracted (under `prefix`) against the digests
    recorded at build time (the `_appliance_bundle` module, inside the executable's own archive, never
    extracted). Raises RuntimeError naming every file that differs or is missing; returns how many
    were checked (0 for a source install, or a build without the table)."""
    if not getattr(sys, "frozen", False):
        return 0

    try:
        from _appliance_bundle import DIGESTS  # type: ignore[import-not-found]
    except ImportError:
        return 0
    base = Path(getattr(sys, "_MEIPASS", ""))
    bad: list[str] = []
    checked = 0
    for rel, digests in DIGESTS.items():
        if not rel.startswith(prefix):
            continue
        checked += 1
        try:
            digest = file_sha256(base / rel)
        except OSError:
            bad.append(f"{rel} (missing)")
            continue
        if digest not in digests:  # the digests the build could have put there
            bad.append(rel)
    if bad:
        raise RuntimeError(f"extracted files differ from this binary's build: {', '.join(bad[:10])}"
                           + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
    return checked
