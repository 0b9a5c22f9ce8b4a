"""Verify an attestation document: evidence, claims, nonce and policy, factor by factor.

Every factor is reported as pass, fail or skip; skip says what could not be checked (for example TCB
status, which needs vendor collateral fetched online). `verify_attestation` raises
`AttestationFailed` (carrying the full report) when any factor fails; it never returns a failure.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .claims import ClaimsError, parse_claims, report_data
from .formats import FORMATS, Factor, FormatResult
from .measurements import ReplayError, replay
from .policy import Policy
from .signing import key_id

__all__ = ["Factor", "VerificationReport", "AttestationFailed", "verify_attestation", "MAX_EVIDENCE_BYTES"]

MAX_EVIDENCE_BYTES = 64 * 1024
MAX_CLAIMS_BYTES = 64 * 1024


@dataclass
class VerificationReport:
    factors: list[Factor] = field(default_factory=list)
    claims: dict[str, Any] | None = None
    claims_bytes: bytes = b""
    provider: str | None = None
    format: str | None = None
    signing_key: Ed25519PublicKey | None = None
    measurements: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, status: str, detail: str) -> None:
        self.factors.append(Factor(name, status, detail))

    @property
    def ok(self) -> bool:
        return bool(self.factors) and all(f.status != "fail" for f in self.factors)

    def failures(self) -> list[Factor]:
        return [f for f in self.factors if f.status == "fail"]

    def table(self) -> str:
        width = max((len(f.name) for f in self.factors), default=6)
        lines = [f"{'factor':<{width}}  status  detail"]
        lines += [f"{f.name:<{width}}  {f.status:<6}  {f.detail}" for f in self.factors]
        return "\n".join(lines)


class AttestationFailed(Exception):
    def __init__(self, report: VerificationReport) -> None:
        names = ", ".join(f.name for f in report.failures()) or "no factor passed"
        super().__init__(f"attestation failed: {names}")
        self.report = report


def _b64(doc: dict[str, Any], key: str, limit: int, report: VerificationReport, *, optional: bool = False) -> bytes | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        report.add("document", "fail", f"{key} missing or not a string")
        return None
    if len(value) > limit * 4 // 3 + 8:
        report.add("document", "fail", f"{key} larger than {limit} bytes")
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        report.add("document", "fail", f"{key} is not base64")
        return None


def verify_attestation(
    doc: dict[str, Any],
    *,
    nonce: str,
    policy: Policy,
    now: float | None = None,
    observed_tls_sha256: str | None = None,
) -> VerificationReport:
    """Check an attestation document fetched with `nonce`; raise AttestationFailed unless all pass."""
    now = time.time() if now is None else now
    report = VerificationReport()
    if not isinstance(doc, dict) or doc.get("version") != 1:
        report.add("document", "fail", "not an attestation document of version 1")
        raise AttestationFailed(report)
    claims_bytes = _b64(doc, "claims_b64", MAX_CLAIMS_BYTES, report)
    evidence = _b64(doc, "evidence_b64", MAX_EVIDENCE_BYTES, report)
    aux = _b64(doc, "aux_b64", MAX_EVIDENCE_BYTES, report, optional=True)
    if claims_bytes is None or evidence is None or report.failures():
        raise AttestationFailed(report)
    report.claims_bytes = claims_bytes
    report.provider = doc.get("provider")
    report.format = doc.get("format")

    # 1. The evidence: signed by the hardware, and its report data equals SHA-512 over the claims.
    # A JSON list or object here is not a format name (and not hashable): unknown, like any other.
    handler = FORMATS.get(report.format) if isinstance(report.format, str) else None
    if handler is None:
        report.add("evidence-format", "fail", f"unknown evidence format {report.format!r}")
        raise AttestationFailed(report)
    expected_rd = report_data(claims_bytes)
    result: FormatResult = handler.check(evidence, aux, report_data=expected_rd, policy=policy, now=now)
    report.factors.extend(result.factors)
    report.measurements = result.measurements
    if result.provider != report.provider:
        report.add("provider", "fail", f"document says {report.provider!r}, evidence is {result.provider!r}")
    elif result.provider == "simulated":
        report.add(
            "provider", "pass" if policy.allow_simulated else "fail",
            "SIMULATED: no TEE protects this appliance" + (" (allowed by policy)" if policy.allow_simulated else ""),
        )
    elif result.provider not in policy.allowed_providers:
        report.add("provider", "fail", f"{result.provider} is not in the policy's allowed_providers")
    else:
        report.add("provider", "pass", result.provider)

    # 2. The claims, now bound to the evidence: parse, then check against the nonce and the policy.
    try:
        claims = parse_claims(claims_bytes)
    except ClaimsError as e:
        report.add("claims", "fail", str(e))
        raise AttestationFailed(report) from None
    report.claims = claims
    report.add("claims", "pass", f"appliance {claims['appliance_version']} ({claims['variant']})")
    if hmac.compare_digest(claims["nonce"].encode(), nonce.lower().encode()):
        report.add("nonce", "pass", "the evidence answers this request's nonce")
    else:
        report.add("nonce", "fail", "the claims carry another nonce (replayed evidence?)")
    if claims.get("provider") != result.provider:
        report.add("claims-provider", "fail", "claims name another provider than the evidence")
    if policy.max_age_seconds is None:
        report.add("freshness", "skip", "no max_age_seconds in the policy")
    elif abs(now - int(claims["timestamp"])) > policy.max_age_seconds:
        report.add("freshness", "fail", f"claims timestamp is more than {policy.max_age_seconds}s from now")
    else:
        report.add("freshness", "pass", "claims timestamp within max_age_seconds")

    binary = claims["binary"]
    if policy.binary_sha256:
        ok = binary["sha256"] in policy.binary_sha256
        report.add("binary", "pass" if ok else "fail", f"{binary['kind']} sha256 {binary['sha256'][:16]}…")
    else:
        report.add("binary", "skip", "no binary_sha256 in the policy (any binary accepted)")

    telemetry = claims.get("telemetry_policy_sha256")
    if policy.telemetry_policy_sha256:
        ok = telemetry in policy.telemetry_policy_sha256
        report.add("telemetry-policy", "pass" if ok else "fail",
                   f"telemetry policy sha256 {str(telemetry)[:16]}…" if telemetry else "the claims name no telemetry policy")
    elif telemetry:
        report.add("telemetry-policy", "skip", f"telemetry policy sha256 {str(telemetry)[:16]}…; no "
                   "telemetry_policy_sha256 in the policy (any telemetry policy accepted)")

    digests = {m["name"]: m["sha256"] for m in claims["models"]}
    missing = [n for n in policy.required_models if n not in digests]
    bad = [n for n, d in digests.items() if policy.model_sha256 and d not in policy.model_sha256]
    if missing or bad:
        report.add("models", "fail", f"missing {missing}, digests not allowed {bad}")
    elif policy.model_sha256 or policy.required_models:
        report.add("models", "pass", f"{len(digests)} model(s), all allowed")
    else:
        report.add("models", "skip", f"{len(digests)} model(s); no model_sha256 in the policy")
    # A model mapped from the host's disk can change after it was hashed (spec/attestation.md §2.1).
    mapped = [m["name"] for m in claims["models"] if m.get("mmap") is True]
    unsaid = [m["name"] for m in claims["models"] if "mmap" not in m]
    if mapped and not policy.allow_mmap:
        report.add("models-in-memory", "fail", f"mapped from the host's disk, not read into sealed memory: {mapped}")
    elif mapped:
        report.add("models-in-memory", "pass", f"mapped from a disk the policy trusts (allow_mmap): {mapped}")
    elif unsaid:
        report.add("models-in-memory", "skip", f"the claims do not say how {unsaid} were loaded (an older appliance)")
    else:
        report.add("models-in-memory", "pass", f"{len(digests)} model(s) read once into sealed memory")

    # 3. Runtime measurements: replay the event log to the register the hardware reports.
    events = [e.get("event") for e in claims.get("runtime_measurements", []) if e.get("extended")]
    if result.runtime_register is None:
        report.add("event-log", "skip", "no runtime measurement register on this platform")
    else:
        try:
            value = replay(events)
        except ReplayError as e:
            report.add("event-log", "fail", str(e))
        else:
            ok = hmac.compare_digest(value, result.runtime_register)
            report.add("event-log", "pass" if ok else "fail", f"{len(events)} event(s) replayed" + ("" if ok else " to another value"))
        logged = {e["name"]: e["sha256"] for e in events if isinstance(e, dict)}
        if any(logged.get(n) != d for n, d in digests.items()):
            report.add("models-measured", "fail", "a claimed model is not in the measured event log")

    if claims.get("tls_public_key_sha256") or observed_tls_sha256:
        ok = claims.get("tls_public_key_sha256") == observed_tls_sha256
        report.add("tls-key", "pass" if ok else "fail", "TLS key is the attested one" if ok else "TLS key differs from the attested one")

    key = claims["signing_key"]
    try:
        raw = base64.b64decode(key["public_key"], validate=True)
        report.signing_key = Ed25519PublicKey.from_public_bytes(raw)
        ok = key_id(raw) == key["kid"]
        report.add("signing-key", "pass" if ok else "fail", f"kid {key['kid'][:16]}…")
    except (ValueError, binascii.Error):
        report.add("signing-key", "fail", "malformed signing public key")

    if not report.ok:
        raise AttestationFailed(report)
    return report
