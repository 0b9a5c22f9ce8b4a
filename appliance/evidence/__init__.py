"""TEE evidence providers: hand 64 bytes of report data to the hardware, return its exact bytes.

Each provider talks to one kernel or device interface, rooted at a configurable path so tests can
drive it against fixtures that behave like the real interface. Providers block (file and ioctl I/O,
sometimes retries): call them from a thread, never the event loop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Evidence", "EvidenceProvider", "SimulatedProvider", "ProviderError", "detect_provider", "MeasurementEvent"]

log = logging.getLogger("appliance.tee")


class ProviderError(Exception):
    """The TEE interface failed or is absent; the message is safe to log."""


@dataclass(frozen=True)
class Evidence:
    provider: str  # tdx | sev-snp | nitro | gramine-sgx | simulated
    format: str  # tdx-quote-v4 | sev-snp-report | nitro-cose-sign1 | sgx-quote-v3 | simulated-v1
    data: bytes  # exactly what the hardware returned
    aux: bytes | None = None  # e.g. the SEV-SNP certificate table (configfs auxblob)


@dataclass(frozen=True)
class MeasurementEvent:
    """A runtime measurement: `digest` (hex) extended into `register` at load time."""

    register: str  # e.g. "rtmr3" or "pcr16"
    algorithm: str  # sha384 for RTMR, sha384 for Nitro PCRs
    digest: str
    description: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"register": self.register, "algorithm": self.algorithm, "digest": self.digest, "event": self.description}


class EvidenceProvider(Protocol):
    @property
    def name(self) -> str: ...

    def evidence(self, report_data: bytes) -> Evidence: ...

    def extend(self, event: MeasurementEvent) -> bool:
        """Extend a runtime measurement register; False where the platform has none."""
        ...


class SimulatedProvider:
    """For machines without a TEE. Its evidence says so in every field; verifiers refuse it by default."""

    name = "simulated"

    def __init__(self) -> None:
        self.events: list[MeasurementEvent] = []

    def evidence(self, report_data: bytes) -> Evidence:
        if len(report_data) != 64:
            raise ProviderError("report data must be exactly 64 bytes")
        doc = {
            "format": "simulated-v1",
            "simulated": True,
            "tee": "none: SIMULATED, NOT A TRUSTED EXECUTION ENVIRONMENT",
            "report_data": report_data.hex(),
            "measurement": "SIMULATED",
            "signature": "NONE: SIMULATED EVIDENCE IS NOT SIGNED",
        }
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return Evidence("simulated", "simulated-v1", data)

    def extend(self, event: MeasurementEvent) -> bool:
        self.events.append(event)
        return False


def detect_provider(
    kind: str, *, configfs_root: Path, nsm_device: Path, gramine_root: Path, rtmr_path: Path | None = None
) -> EvidenceProvider:
    """The configured provider, or with `auto` the first TEE interface present, else simulated."""
    if kind in ("configfs-tsm", "auto") and configfs_root.is_dir():
        from appliance.evidence.configfs import ConfigfsTsmProvider

        if rtmr_path:
            return ConfigfsTsmProvider(configfs_root, rtmr_path=rtmr_path)
        return ConfigfsTsmProvider(configfs_root)
    if kind in ("nitro", "auto") and nsm_device.exists():
        from appliance.evidence.nitro import NitroProvider

        return NitroProvider(nsm_device)
    if kind in ("gramine-sgx", "auto") and (gramine_root / "quote").exists():
        from appliance.evidence.gramine import GramineProvider

        return GramineProvider(gramine_root)
    if kind in ("simulated", "auto"):
        if kind == "auto":
            log.warning("no TEE interface found: serving SIMULATED attestation evidence")
        return SimulatedProvider()
    raise ProviderError(f"attestation provider {kind!r} is not available on this machine")
