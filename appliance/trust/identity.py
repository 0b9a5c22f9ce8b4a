"""The appliance's signing identity: an Ed25519 key made in memory at boot, never written or logged.

Generated once in the gunicorn master before the worker forks, so the appliance has one identity
whatever happens to its worker; the attestation binds its public key to TEE evidence.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation.signing import RequestInfo, StreamChain, WebSocketChain, key_id, sign_response_headers

__all__ = ["Identity"]


class Identity:
    def __init__(
        self,
        private_key: Ed25519PrivateKey | None = None,
        *,
        clock: Callable[[], float] | None = None,
        random_token: Callable[[], str] = lambda: secrets.token_urlsafe(16),
    ) -> None:
        import time

        self._key = private_key or Ed25519PrivateKey.generate()
        self.public_raw = self._key.public_key().public_bytes_raw()
        self.kid = key_id(self.public_raw)
        self._clock = clock or time.time
        self._random_token = random_token

    def __repr__(self) -> str:  # never the key material
        return f"Identity(kid={self.kid!r})"

    def public_jwk(self) -> dict[str, str]:
        x = base64.urlsafe_b64encode(self.public_raw).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.kid, "alg": "EdDSA", "use": "sig"}

    def public_b64(self) -> str:
        return base64.b64encode(self.public_raw).decode()

    def sign_response(self, request: RequestInfo, status: int, headers: dict[str, str], body: bytes | None) -> dict[str, str]:
        created = datetime.datetime.fromtimestamp(int(self._clock()), tz=datetime.UTC)
        return sign_response_headers(
            self._key, self.kid, request=request, status=status, headers=headers, body=body,
            created=created, nonce=self._random_token(),
        )

    def sign_bytes(self, data: bytes) -> bytes:
        """Raw Ed25519 over caller-built, domain-separated bytes (stream checkpoints, attestation)."""
        return self._key.sign(data)

    def stream_checkpoint(self, chain: StreamChain) -> bytes:
        return chain.checkpoint_line(self._key)

    def ws_checkpoint(self, chain: WebSocketChain) -> dict[str, Any]:
        return chain.checkpoint_fields(self._key)

    def ws_final(
        self, chain: WebSocketChain, request: RequestInfo, finish_reason: str | None, usage: dict[str, Any] | None,
        conversation: tuple[bytes, bytes] | None = None,
    ) -> dict[str, Any]:
        return chain.signed_final(self._key, request, finish_reason, usage, conversation)

    def stream_final(
        self, chain: StreamChain, request: RequestInfo, finish_reason: str | None, usage: dict[str, Any] | None,
        conversation: tuple[bytes, bytes] | None = None,
    ) -> bytes:
        return chain.final_line(self._key, request, finish_reason, usage, conversation)
