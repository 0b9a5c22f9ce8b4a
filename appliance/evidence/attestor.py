"""`GET /v1/attestation?nonce=<64 hex>`: claims + the TEE's raw evidence binding them.

The claims name this binary, the loaded models, the effective configuration and the signing key, and
carry the client's nonce; the TEE signs SHA-512 over their exact bytes (attestation.claims). The
answer is itself a signed response, like every other.
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable

import gevent
from gevent import monkey

from appliance.buildinfo import VERSION, binary_digest, variant
from appliance.evidence import EvidenceProvider, MeasurementEvent, ProviderError
from appliance.settings import Settings
from appliance.trust.auth import RateLimiter
from appliance.web.errors import BadRequest, NotReady, RateLimited
from attestation.claims import NONCE_RE, Claims, ModelClaim, report_data
from attestation.measurements import event_digest, model_event

__all__ = ["Attestor", "AttestationResource"]

log = logging.getLogger("appliance.attestation")


class Attestor:
    """Builds claims and gets evidence; keeps the runtime measurement log."""

    def __init__(
        self,
        settings: Settings,
        identity,
        models,
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
        self.event_log: list[dict] = []
        self._config_sha256 = settings.public_digest()
        self._variant = settings.attestation.variant
        # A real lock: models load on pool threads, and the log must list extends in their order.
        self._measure_lock = monkey.get_original("_thread", "allocate_lock")()
        # Read once here (at worker start): for configfs it probes the kernel interface.
        self.provider_name = provider.name if provider else "none"

    def claims(self, nonce: str) -> Claims:
        kind, digest = binary_digest()
        ready = [r for r in self.models.records() if r.state == "ready" and r.sha256]
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
            models=tuple(ModelClaim(r.name, r.sha256, mmap=r.mmap) for r in ready),
            tls_public_key_sha256=self.tls_public_key_sha256,
            runtime_measurements=tuple(self.event_log),
            backend=_backend_claim(),
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


class AttestationResource:
    def __init__(self, attestor: Attestor, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.attestor = attestor
        self.limiter = RateLimiter(settings.attestation.rate_per_minute, max(1, settings.attestation.rate_per_minute // 6 or 1), clock)

    def on_get(self, req, resp) -> None:
        nonce = req.get_param("nonce")
        if not nonce or not NONCE_RE.match(nonce):
            raise BadRequest("nonce: required, 64 lowercase hex characters (32 random bytes)", param="nonce")
        wait = self.limiter.take(f"ip:{req.remote_addr}")
        if wait is not None:
            raise RateLimited("Too many attestation requests", headers={"Retry-After": str(max(1, math.ceil(wait)))})
        a = self.attestor
        if a.provider is None:
            raise NotReady("Attestation is disabled on this appliance")
        claims = a.claims(nonce)
        raw = claims.encode()
        rd = report_data(raw)
        try:
            ev = gevent.get_hub().threadpool.apply(a.provider.evidence, (rd,))
        except ProviderError as e:
            log.error("attestation evidence failed: %s", e)
            raise NotReady("TEE evidence is unavailable right now", headers={"Retry-After": "1"}) from None
        resp.media = {
            "version": 1,
            "provider": ev.provider,
            "format": ev.format,
            "claims": claims.to_dict(),
            "claims_b64": base64.b64encode(raw).decode(),
            "report_data": rd.hex(),
            "evidence_b64": base64.b64encode(ev.data).decode(),
            "aux_b64": base64.b64encode(ev.aux).decode() if ev.aux else None,
            "event_log": list(a.event_log),
        }


def _backend_claim() -> dict | None:
    """The CPU build llama.cpp really runs (after a probe, perhaps a fallback), once one is loaded."""
    from appliance.engine.llama import cpu_backend_choice

    choice = cpu_backend_choice()
    if choice is None:
        return None
    return {"cpu": choice.module, "extra_buffers": choice.extra_buffers, "fallback": choice.fell_back}
