"""The appliance's public signing key, and the attestation document that binds it to the TEE."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import falcon

from appliance.evidence import ProviderError
from appliance.evidence.attestor import AttestationDisabled, Attestor
from appliance.metrics import Metrics
from appliance.settings import Settings
from appliance.trust.auth import RateLimiter
from appliance.trust.identity import Identity
from appliance.web.errors import ApiError, BadRequest, NotReady, RateLimited, retry_after
from attestation.claims import NONCE_RE

__all__ = ["Keys", "Attestation"]

log = logging.getLogger("appliance.attestation")


class Keys:
    """The public half of the appliance's signing identity (the attestation binds it to evidence)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {
            "kid": self.identity.kid,
            "alg": "ed25519",
            "public_key": self.identity.public_b64(),
            "keys": [self.identity.public_jwk()],
        }


class Attestation:
    """`GET /v1/attestation?nonce=<64 hex>`: claims + the TEE's raw evidence binding them."""

    def __init__(
        self, attestor: Attestor, settings: Settings, clock: Callable[[], float] = time.time, metrics: Metrics | None = None
    ) -> None:
        self.attestor = attestor
        self.metrics = metrics
        rate = settings.attestation.rate_per_minute
        self.limiter = RateLimiter(rate, max(1, rate // 6 or 1), clock)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        status = "500"
        try:
            self._attest(req, resp)
            status = "200"
        except ApiError as e:
            status = str(e.status)
            raise
        finally:
            if self.metrics is not None:
                self.metrics.attestations.labels(self.attestor.provider_name, status).inc()

    def _attest(self, req: falcon.Request, resp: falcon.Response) -> None:
        nonce = req.get_param("nonce")
        if not nonce or not NONCE_RE.match(nonce):
            raise BadRequest("nonce: required, 64 lowercase hex characters (32 random bytes)", param="nonce")
        wait = self.limiter.take(f"ip:{req.remote_addr}")
        if wait is not None:
            raise RateLimited("Too many attestation requests", headers=retry_after(wait))
        try:
            resp.media = self.attestor.document(nonce)
        except AttestationDisabled as e:
            raise NotReady(str(e)) from None
        except ProviderError as e:
            log.error("attestation evidence failed: %s", e)
            raise NotReady("TEE evidence is unavailable right now", headers={"Retry-After": "1"}) from None
