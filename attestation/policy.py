"""What a client requires of an appliance before it sends a prompt.

A policy file is TOML (or JSON). Every field is optional; what is not set is reported as a skipped
factor, never silently passed. Example:

    allowed_providers = ["tdx", "sev-snp"]
    allow_simulated = false
    allow_debug = false
    allow_mmap = false        # true: accept models mapped from the host's disk (a dm-verity volume, say)
    max_age_seconds = 300
    binary_sha256 = ["<sha256 of dist/appliance>"]
    model_sha256 = ["<sha256 of each allowed model file>"]
    required_models = ["llama3-8b"]

    [tdx]
    mrtd = "<96 hex>"
    rtmr0 = "<96 hex>"

    [sev_snp]
    measurement = "<96 hex>"

    [nitro]
    pcr0 = "<96 hex>"

    [sgx]
    mrenclave = "<64 hex>"
    mrsigner = "<64 hex>"
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = ["Policy", "PolicyError", "load_policy", "ALL_PROVIDERS"]

ALL_PROVIDERS = ("tdx", "sev-snp", "nitro", "gramine-sgx")


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Policy:
    allowed_providers: tuple[str, ...] = ALL_PROVIDERS
    allow_simulated: bool = False
    allow_debug: bool = False
    allow_mmap: bool = False
    """Accept models the appliance maps from its host's disk instead of reading them into sealed memory."""
    max_age_seconds: int | None = 300
    binary_sha256: tuple[str, ...] = ()
    model_sha256: tuple[str, ...] = ()
    required_models: tuple[str, ...] = ()
    telemetry_policy_sha256: tuple[str, ...] = ()
    """The telemetry policies (spec/telemetry.md) the appliance may enforce: its SHA-256 is in the claims."""
    tdx: dict[str, Any] = field(default_factory=dict)
    sev_snp: dict[str, Any] = field(default_factory=dict)
    nitro: dict[str, Any] = field(default_factory=dict)
    sgx: dict[str, Any] = field(default_factory=dict)
    roots: dict[str, Any] = field(default_factory=dict)
    """Extra trusted root certificates by vendor (PEM paths): for tests and private PKIs only."""

    def with_simulated(self) -> Policy:
        return Policy(**{**{f.name: getattr(self, f.name) for f in fields(self)}, "allow_simulated": True})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise PolicyError(f"policy: unknown keys {sorted(unknown)}")
        out = {}
        for k, v in data.items():
            if k in ("allowed_providers", "binary_sha256", "model_sha256", "required_models", "telemetry_policy_sha256"):
                if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                    raise PolicyError(f"policy: {k} must be a list of strings")
                v = tuple(x.lower() if k.endswith("sha256") else x for x in v)
            elif k in ("allow_simulated", "allow_debug", "allow_mmap"):
                if not isinstance(v, bool):
                    raise PolicyError(f"policy: {k} must be true or false")
            elif k == "max_age_seconds":
                if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
                    raise PolicyError("policy: max_age_seconds must be a positive integer")
            elif k in ("tdx", "sev_snp", "nitro", "sgx", "roots"):
                if not isinstance(v, dict):
                    raise PolicyError(f"policy: [{k}] must be a table")
                v = {kk: (vv.lower() if isinstance(vv, str) and k != "roots" else vv) for kk, vv in v.items()}
            out[k] = v
        return cls(**out)

    @classmethod
    def from_manifest(cls, path: Path | str, **overrides: Any) -> Policy:
        """Expected binary and model digests from a build manifest (`make binary` writes one)."""
        m = json.loads(Path(path).read_text())
        data = {"binary_sha256": [m["binary"]["sha256"]]}
        if m.get("model"):
            data["model_sha256"] = [m["model"]["sha256"]]
        data.update(overrides)
        return cls.from_dict(data)


def load_policy(path: Path | str) -> Policy:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as e:
        raise PolicyError(f"policy: cannot read {p}: {e.strerror}") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise PolicyError(f"policy: {p} does not parse: {e}") from None
    if isinstance(data, dict) and "binary" in data and "build" in data:
        return Policy.from_manifest(p)
    return Policy.from_dict(data)
