"""Claims: the canonical, versioned statement of what runs, and the 64 bytes the TEE binds.

The appliance serves the exact claim bytes it hashed (base64), never a re-encoding; a verifier
hashes those bytes, compares with the evidence's report data, and only then parses them.

    report_data = SHA-512(b"appliance-claims-v1\\x00" || claims_bytes)      (64 bytes)

`claims_bytes` is canonical JSON: UTF-8, keys sorted, separators "," and ":", ASCII only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLAIMS_VERSION",
    "REPORT_DATA_DOMAIN",
    "NONCE_RE",
    "ModelClaim",
    "Claims",
    "canonical_json",
    "report_data",
    "parse_claims",
    "ClaimsError",
]

CLAIMS_VERSION = 1
REPORT_DATA_DOMAIN = b"appliance-claims-v1\x00"
NONCE_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ClaimsError(ValueError):
    """Claims bytes are malformed or not of a supported version."""


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def report_data(claims_bytes: bytes) -> bytes:
    """The 64 bytes handed to the TEE (TDX/SNP REPORTDATA, SGX report data, Nitro user_data)."""
    return hashlib.sha512(REPORT_DATA_DOMAIN + claims_bytes).digest()


@dataclass(frozen=True)
class ModelClaim:
    name: str
    sha256: str
    mmap: bool | None = None  # mapped from the host's disk (true) or read once into sealed memory (false)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "sha256": self.sha256}
        if self.mmap is not None:
            out["mmap"] = self.mmap
        return out


@dataclass(frozen=True)
class Claims:
    appliance_version: str
    variant: str  # "cpu" | "cuda"
    binary_kind: str  # "frozen" (the PyInstaller executable) | "package" (a source install)
    binary_sha256: str
    config_sha256: str
    signing_public_key: str  # raw Ed25519, base64
    signing_kid: str
    nonce: str  # 64 lowercase hex characters (32 bytes) chosen by the client
    timestamp: int
    provider: str
    models: tuple[ModelClaim, ...] = ()
    tls_public_key_sha256: str | None = None
    runtime_measurements: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    # The llama.cpp CPU build that really runs ({"cpu": "cpu-zen4", "extra_buffers": true,
    # "fallback": false}), once a model has loaded; omitted before.
    backend: dict[str, Any] | None = None
    # SHA-256 of the canonical telemetry policy the binary enforces (spec/telemetry.md).
    telemetry_policy_sha256: str | None = None
    # SHA-256 of the web UI's canonical manifest.json (its files' digests), when the appliance serves one.
    ui_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": CLAIMS_VERSION,
            "appliance_version": self.appliance_version,
            "variant": self.variant,
            "binary": {"kind": self.binary_kind, "sha256": self.binary_sha256},
            "config_sha256": self.config_sha256,
            "signing_key": {"alg": "ed25519", "public_key": self.signing_public_key, "kid": self.signing_kid},
            "nonce": self.nonce,
            "timestamp": self.timestamp,
            "provider": self.provider,
            "models": [m.to_dict() for m in sorted(self.models, key=lambda m: m.name)],
            "tls_public_key_sha256": self.tls_public_key_sha256,
            "runtime_measurements": list(self.runtime_measurements),
        }
        if self.backend is not None:
            out["backend"] = dict(self.backend)
        if self.telemetry_policy_sha256 is not None:
            out["telemetry_policy_sha256"] = self.telemetry_policy_sha256
        if self.ui_sha256 is not None:
            out["ui_sha256"] = self.ui_sha256
        return out

    def encode(self) -> bytes:
        return canonical_json(self.to_dict())


def parse_claims(claims_bytes: bytes) -> dict[str, Any]:
    """Parse claim bytes a verifier has already bound to evidence; checks shape, not truth."""
    try:
        obj = json.loads(claims_bytes)
    except ValueError:
        raise ClaimsError("claims: not JSON") from None
    if not isinstance(obj, dict) or obj.get("version") != CLAIMS_VERSION:
        raise ClaimsError(f"claims: unsupported version {obj.get('version') if isinstance(obj, dict) else None!r}")
    if canonical_json(obj) != claims_bytes:
        raise ClaimsError("claims: not in canonical form")
    try:
        if not NONCE_RE.match(obj["nonce"]):
            raise ClaimsError("claims: nonce is not 64 hex characters")
        if not _HEX64.match(obj["binary"]["sha256"]) or not _HEX64.match(obj["config_sha256"]):
            raise ClaimsError("claims: digests must be 64 hex characters")
        for optional in ("telemetry_policy_sha256", "ui_sha256"):
            if optional in obj and not (isinstance(obj[optional], str) and _HEX64.match(obj[optional])):
                raise ClaimsError("claims: digests must be 64 hex characters")
        for m in obj["models"]:
            if not _HEX64.match(m["sha256"]):
                raise ClaimsError(f"claims: model {m.get('name')!r} digest is not 64 hex characters")
        obj["signing_key"]["public_key"], obj["signing_key"]["kid"]
    except (KeyError, TypeError):
        raise ClaimsError("claims: missing or malformed fields") from None
    return obj
