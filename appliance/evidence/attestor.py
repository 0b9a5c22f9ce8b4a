"""Claims and the TEE's raw evidence binding them, and the runtime measurement log.

The claims name this binary, the loaded models, the effective configuration and the signing key, and
carry the client's nonce; the TEE signs SHA-512 over their exact bytes (attestation.claims). The web
layer serves the document at `GET /v1/attestation?nonce=<64 hex>` as a signed response, like every other.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.buildinfo import VERSION, binary_digest, variant
from appliance.engine.registry import ModelRegistry
from appliance.evidence import EvidenceProvider, MeasurementEvent, ProviderError
from appliance.osthreads import off_loop, real_lock
from appliance.settings import Settings
from appliance.telemetry import policy_sha256
from appliance.trust.identity import Identity
from attestation.claims import Claims, ModelClaim, report_data
from attestation.measurements import event_digest, model_event

__all__ = ["Attestor", "AttestationDisabled"]

log = logging.getLogger("appliance.attestation")


class AttestationDisabled(Exception):
    """No evidence provider is configured (attestation.provider = "none")."""


class Attestor:
    """Builds claims and gets evidence; keeps the runtime measurement log."""

    def __init__(
        self,
        settings: Settings,
        identity: Identity,
        models: ModelRegistry,
        provider: EvidenceProvider | None,
        *,
        clock: Callable[[], float] = time.time,
        tls_public_key_sha256: str | None = None,
    ) -> None:
        self.settings = settings
        self.identity = identity
        self.models = models
        self.provider = provider
        self.clock = clock
        self.tls_public_key_sha256 = tls_public_key_sha256
        self.event_log: list[dict[str, Any]] = []
        self._config_sha256 = settings.public_digest()
        self._variant = settings.attestation.variant
        # The web UI's manifest, read once here; the UI resource serves the copy it read only if it is
        # the same (appliance/web/resources/ui.py).
        self.ui_sha256 = _ui_sha256()
        # A real lock: models load on pool threads, and the log must list extends in their order.
        self._measure_lock = real_lock()
        # Read once here (at worker start): for configfs it probes the kernel interface.
        self.provider_name = provider.name if provider else "none"
        # How the last request for evidence went: /status says so when the TEE interface fails (the
        # appliance keeps serving completions; only attestation answers 503 meanwhile).
        self._evidence_ok: bool | None = None
        self._evidence_error: str | None = None
        self._evidence_at: float | None = None

    def claims(self, nonce: str) -> Claims:
        kind, digest = binary_digest()
        ready = [(r, r.sha256) for r in self.models.records() if r.state == "ready" and r.sha256]
        return Claims(
            appliance_version=VERSION,
            variant=self._variant or variant(),
            binary_kind=kind,
            binary_sha256=digest,
            config_sha256=self._config_sha256,
            signing_public_key=self.identity.public_b64(),
            signing_kid=self.identity.kid,
            nonce=nonce,
            timestamp=int(self.clock()),
            provider=self.provider_name,
            models=tuple(ModelClaim(r.name, sha256, mmap=r.mmap) for r, sha256 in ready),
            tls_public_key_sha256=self.tls_public_key_sha256,
            runtime_measurements=tuple(self.event_log),
            backend=_backend_claim(self.models),
            telemetry_policy_sha256=policy_sha256(),
            ui_sha256=self.ui_sha256,
        )

    def measure_model(self, name: str, sha256_hex: str) -> None:
        """Extend the model's digest into the runtime register (blocking: call from a thread)."""
        if self.provider is None:
            return
        event = model_event(name, sha256_hex)
        m = MeasurementEvent(
            register=getattr(self.provider, "runtime_register", "none"),
            algorithm="sha384",
            digest=event_digest(event).hex(),
            description=event,
        )
        with self._measure_lock:
            try:
                extended = self.provider.extend(m)
            except ProviderError as e:
                log.error("runtime measurement of model %s failed: %s", name, e)
                extended = False
            self.event_log.append({**m.to_dict(), "extended": bool(extended)})


    def document(self, nonce: str) -> dict[str, Any]:
        """Claims for this nonce, and evidence binding them (blocks only this greenlet: the TEE
        interface is called off the event loop). Raises AttestationDisabled, or ProviderError when
        the TEE gives no evidence right now."""
        if self.provider is None:
            raise AttestationDisabled("Attestation is disabled on this appliance")
        claims = self.claims(nonce)
        raw = claims.encode()
        rd = report_data(raw)
        try:
            ev = off_loop(self.provider.evidence, rd)
        except ProviderError as e:
            self._evidence_ok, self._evidence_error, self._evidence_at = False, str(e), self.clock()
            raise
        self._evidence_ok, self._evidence_error, self._evidence_at = True, None, self.clock()
        return {
            "version": 1,
            "provider": ev.provider,
            "format": ev.format,
            "claims": claims.to_dict(),
            "claims_b64": base64.b64encode(raw).decode(),
            "report_data": rd.hex(),
            "evidence_b64": base64.b64encode(ev.data).decode(),
            "aux_b64": base64.b64encode(ev.aux).decode() if ev.aux else None,
            "event_log": list(self.event_log),
        }


    def evidence_status(self) -> dict[str, Any]:
        """For /status: the provider, and whether its last evidence request worked (`unavailable`
        with the provider's error when the TEE interface failed; `untried` before the first)."""
        if self.provider is None:
            state = "disabled"
        elif self._evidence_ok is None:
            state = "untried"
        else:
            state = "ok" if self._evidence_ok else "unavailable"
        return {"provider": self.provider_name, "evidence": state, "error": self._evidence_error,
                "checked_at": self._evidence_at}


def _ui_sha256() -> str | None:
    """SHA-256 of the web UI's manifest.json (it lists every UI file's SHA-256), or None without a UI."""
    try:
        return hashlib.sha256((Path(__file__).resolve().parents[1] / "web" / "ui" / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def _backend_claim(models: ModelRegistry) -> dict[str, Any] | None:
    """The CPU build llama.cpp really runs (after a probe, perhaps a fallback), once one is loaded."""
    choice = models.cpu_backend()
    if choice is None:
        return None
    return {"cpu": choice.module, "extra_buffers": choice.extra_buffers, "fallback": choice.fell_back}
