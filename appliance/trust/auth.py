"""Request authentication, scopes and rate limits.

Modes:
- no keys, loopback bind: open, as in the original appliance (its curl examples work unchanged);
- no keys, `open_inference` off loopback: inference is open, admin routes are closed (403);
- keys configured: every non-public route needs an API key (`Authorization: Bearer`) or an RFC 9421
  client signature, with the route's scope; `require_signed_requests` demands the signature.

API keys are stored only as SHA-256 digests and compared in constant time against every configured
digest. Failures say nothing about why (one message), and are counted by reason in the metrics.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NoReturn

from appliance.metrics import Metrics
from appliance.settings import Settings
from attestation.signing import RequestInfo, VerificationError, public_key_from_b64, verify_request

__all__ = [
    "Auth", "Credentials", "RateLimiter", "ReplayCache", "PUBLIC_ROUTES", "ADMIN_ROUTES",
    "AuthError", "Unauthenticated", "NotPermitted", "TooManyRequests", "ReplayCacheFull",
]

PUBLIC_ROUTES = frozenset({"/health", "/readiness", "/v1/keys", "/v1/attestation", "/", "/ui/{name}"})
ADMIN_ROUTES = frozenset({"/load_model", "/unload_model"})
# Read by a scraper: a key with the `metrics` scope (or `admin`, which includes it) and nothing else
# needed, so Prometheus holds no key that can load models or run inference.
METRICS_ROUTES = frozenset({"/metrics"})
_REFUSED = "Invalid or missing credentials"


class AuthError(Exception):
    """A refused request; `message` is safe to show (it never says which check failed)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unauthenticated(AuthError):
    """No valid credentials (401)."""


class NotPermitted(AuthError):
    """Valid credentials without the scope, or a route that is closed in this mode (403)."""


class TooManyRequests(AuthError):
    """A rate limit (429); `retry_after` seconds until the bucket has a token again."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Credentials:
    """What a request presents, read by the web layer: no framework types cross into trust."""

    route: str
    method: str
    remote_addr: str
    headers: Mapping[str, str]
    """Header names as sent (any case); looked up case-insensitively."""
    request: Callable[[], RequestInfo]
    """The request as signed (target, body, nonce): built only when a signature is checked."""

    def header(self, name: str) -> str | None:
        lower = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == lower), None)


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


class RateLimiter:
    """Token buckets per key: `rate` per minute, up to `burst` at once; bounded memory (LRU)."""

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float], max_keys: int = 100_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float | None:
        """None if allowed, else the seconds to wait."""
        if self.rate <= 0:
            return None
        now = self.clock()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        # A wall clock stepped back (NTP, a restored VM) must not drain the bucket for as long as the
        # step: time that runs backwards adds nothing, and the bucket goes on from the new time.
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = None
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait


class ReplayCacheFull(AuthError):
    """Every remembered nonce is still valid: refuse rather than forget one (that would allow a replay)."""

    def __init__(self, message: str = "Too many signed requests in flight; retry shortly") -> None:
        super().__init__(message)
        self.retry_after = 1.0


class ReplayCache:
    """Nonces seen within their signature's validity, forgotten only once they expire.

    Bounded: when full of still-valid nonces, new signed requests are refused (fail closed) until
    some expire; `signature_window` bounds how long that lasts.
    """

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._seen: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, tuple[str, str]]] = []  # a heap, soonest expiry first

    def check_and_add(self, keyid: str, nonce: str, expires: float) -> bool:
        """True if fresh (and now remembered), False if a replay; raises ReplayCacheFull."""
        now = self.clock()
        while self._expiry and self._expiry[0][0] <= now:
            _, old = heapq.heappop(self._expiry)
            self._seen.pop(old, None)
        key = (keyid, nonce)
        if key in self._seen:
            return False
        if len(self._seen) >= self.max_entries:
            raise ReplayCacheFull()
        self._seen[key] = expires
        heapq.heappush(self._expiry, (expires, key))
        return True


class Auth:
    def __init__(self, settings: Settings, metrics: Metrics, clock: Callable[[], float] = time.time) -> None:
        a = settings.auth
        self.open = not a.keys_configured
        self.loopback = settings.server.loopback
        self.require_signed = a.require_signed_requests
        self.window = a.signature_window
        self.metrics = metrics
        self.clock = clock
        self._api_keys = [(bytes.fromhex(k.sha256), Principal(k.name, frozenset(k.scopes))) for k in a.api_keys]
        self._client_keys = {k.keyid: public_key_from_b64(k.public_key) for k in a.client_keys}
        self._client_principals = {k.keyid: Principal(k.keyid, frozenset(k.scopes)) for k in a.client_keys}
        self.replay = ReplayCache(a.replay_cache_size, clock)
        lim = settings.limits
        self.ip_limit = RateLimiter(lim.rate_per_minute_per_ip, lim.rate_burst, clock)
        self.key_limit = RateLimiter(lim.rate_per_minute_per_key, lim.rate_burst, clock)

    def authenticate(self, creds: Credentials) -> str | None:
        """The principal's name, or None where the route is public or open; raises AuthError."""
        route = creds.route
        if route in PUBLIC_ROUTES:
            return None
        self._limit(f"ip:{creds.remote_addr}")
        if creds.method == "OPTIONS":
            return None  # the framework's OPTIONS responder (CORS preflight, which never carries credentials)
        scope = "admin" if route in ADMIN_ROUTES else "metrics" if route in METRICS_ROUTES else "inference"
        principal = self._authenticate(creds)
        if principal is None:
            if self.open and scope == "inference":
                return None
            if self.open and self.loopback:
                return None  # the original appliance: loopback and no keys means open, admin included
            if self.open:
                self._refuse("no_admin_key", NotPermitted("Model management is disabled: no admin key is configured"))
            self._refuse("missing", Unauthenticated(_REFUSED))
        if scope not in principal.scopes and not (scope == "metrics" and "admin" in principal.scopes):
            self._refuse("scope", NotPermitted(f"This key lacks the {scope} scope"))
        self._limit(f"key:{principal.name}")
        return principal.name

    def _authenticate(self, creds: Credentials) -> Principal | None:
        signed = creds.header("Signature") is not None or creds.header("Signature-Input") is not None
        if self.require_signed and not signed:
            self._refuse("unsigned", Unauthenticated(_REFUSED))
        if signed:
            return self._verify_signature(creds)
        auth = creds.header("Authorization")
        if auth is None or self.open:
            # No keys configured: there is nothing to check a token against. OpenAI clients always
            # send one (often a placeholder), so it is ignored rather than refused.
            return None
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            self._refuse("malformed", Unauthenticated(_REFUSED))
        digest = hashlib.sha256(token.strip().encode()).digest()
        found = None
        for stored, principal in self._api_keys:  # every digest compared, in constant time each
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            self._refuse("invalid_key", Unauthenticated(_REFUSED))
        return found

    def _verify_signature(self, creds: Credentials) -> Principal:
        info = creds.request()
        try:
            v = verify_request(
                self._client_keys, method=info.method, target=info.target, headers=dict(creds.headers),
                body=info.body, now=self.clock(), window=self.window,
            )
        except VerificationError:
            self._refuse("bad_signature", Unauthenticated(_REFUSED))
        try:
            fresh = self.replay.check_and_add(v.keyid, v.nonce, v.expires)
        except ReplayCacheFull:
            self.metrics.auth_failures.labels("replay_cache_full").inc()
            raise
        if not fresh:
            self._refuse("replay", Unauthenticated(_REFUSED))
        return self._client_principals[v.keyid]

    def limit(self, principal: str | None, remote_addr: str | None) -> None:
        """Rate limits for one more request on a long-lived connection (a WebSocket's response.create):
        the address's, and the key's when one authenticated it."""
        self._limit(f"ip:{remote_addr}")
        if principal is not None:
            self._limit(f"key:{principal}")

    def _limit(self, key: str) -> None:
        wait = (self.ip_limit if key.startswith("ip:") else self.key_limit).take(key)
        if wait is not None:
            raise TooManyRequests("Too many requests; slow down", retry_after=wait)

    def _refuse(self, reason: str, error: AuthError) -> NoReturn:
        self.metrics.auth_failures.labels(reason).inc()
        raise error
