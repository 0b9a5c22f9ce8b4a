#!/usr/bin/env python3
"""Regenerate spec/vectors/attestation/: the attestation test vectors of spec/attestation.md.

    .venv/bin/python scripts/make-attestation-vectors.py [--out DIR] [--check]

Deterministic: fixed digests, nonce and times, the published RFC 9421 `test-key-ed25519` as the
appliance's signing key, and Ed25519 signatures are deterministic (RFC 8032). Claims, report data
and simulated evidence go through the appliance's own code (`attestation.claims.Claims`,
`attestation.claims.report_data`, `appliance.tee.SimulatedProvider`, `appliance.security.identity`);
the document is assembled as `appliance.attest.AttestationResource` assembles it. `--check`
compares with what is on disk instead of writing (exit 1 on a difference).

This script writes only the simulated-v1 vectors. Vectors for other formats (TDX, SEV-SNP, Nitro,
SGX) are written by their own fixtures into the same directory in the same file format; `--check`
compares only the files this script makes, and never deletes the others.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_der_private_key  # noqa: E402

from attestation.claims import Claims, ModelClaim, canonical_json, report_data  # noqa: E402
from attestation.measurements import event_digest, model_event  # noqa: E402
from attestation.signing import NONCE_HEADER, RequestInfo  # noqa: E402
from attestation.verify import MAX_EVIDENCE_BYTES  # noqa: E402
from appliance.security.identity import Identity  # noqa: E402
from appliance.tee import SimulatedProvider  # noqa: E402

OUT = ROOT / "spec" / "vectors" / "attestation"
PREFIX = "simulated-"  # every file this script owns starts with it

# RFC 9421 B.1.4 test-key-ed25519 (PKCS#8 DER, base64): the appliance's identity, as in the signing vectors.
APPLIANCE_KEY_PKCS8 = "MC4CAQAwBQYDK2VwBCIEIJ+DYvh6SEqVTm50DFtMDoQikTmiCqirVv9mWG9qfSnF"
# RFC 8032 7.1 TEST 1 seed: "another key" (a man in the middle's).
OTHER_KEY_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"

TIMESTAMP = 1_700_000_000  # 2023-11-14T22:13:20Z: the claims' timestamp and the response's `created`
NOW = TIMESTAMP + 30  # the verifier's clock
NONCE = hashlib.sha256(b"appliance attestation vector nonce 1").hexdigest()
OTHER_NONCE = hashlib.sha256(b"appliance attestation vector nonce 2").hexdigest()
BINARY_SHA256 = hashlib.sha256(b"appliance attestation vector binary").hexdigest()
CONFIG_SHA256 = hashlib.sha256(b"appliance attestation vector config").hexdigest()
MODEL = "appliance-test"
MODEL_SHA256 = hashlib.sha256(b"appliance attestation vector model").hexdigest()
VERSION = "0.1.0"

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def appliance_key() -> Ed25519PrivateKey:
    key = load_der_private_key(base64.b64decode(APPLIANCE_KEY_PKCS8), None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes.fromhex(OTHER_KEY_SEED))


def identity(key: Ed25519PrivateKey, sig_nonce: str) -> Identity:
    return Identity(key, clock=lambda: float(TIMESTAMP), random_token=lambda: sig_nonce)


def event_log() -> list[dict]:
    """What the appliance logs loading MODEL on the simulated provider (which extends nothing)."""
    ev = model_event(MODEL, MODEL_SHA256)
    return [{"register": "none", "algorithm": "sha384", "digest": event_digest(ev).hex(), "event": ev, "extended": False}]


def claims(nonce: str = NONCE, *, timestamp: int = TIMESTAMP, key: Ed25519PrivateKey | None = None) -> Claims:
    ident = identity(key or appliance_key(), "unused")
    return Claims(
        appliance_version=VERSION,
        variant="cpu",
        binary_kind="frozen",
        binary_sha256=BINARY_SHA256,
        config_sha256=CONFIG_SHA256,
        signing_public_key=ident.public_b64(),
        signing_kid=ident.kid,
        nonce=nonce,
        timestamp=timestamp,
        provider="simulated",
        models=(ModelClaim(MODEL, MODEL_SHA256),),
        tls_public_key_sha256=None,
        runtime_measurements=tuple(event_log()),
    )


def document(claims_bytes: bytes, *, evidence: bytes | None = None, claims_obj: dict | None = None, **override) -> dict:
    """The document as AttestationResource serves it; evidence defaults to simulated evidence over the claims."""
    rd = report_data(claims_bytes)
    if evidence is None:
        evidence = SimulatedProvider().evidence(rd).data
    doc = {
        "version": 1,
        "provider": "simulated",
        "format": "simulated-v1",
        "claims": claims_obj if claims_obj is not None else json.loads(claims_bytes),
        "claims_b64": b64(claims_bytes),
        "report_data": rd.hex(),
        "evidence_b64": b64(evidence),
        "aux_b64": None,
        "event_log": event_log(),
    }
    doc.update(override)
    return doc


def signed_response(doc: dict, nonce: str, *, key: Ed25519PrivateKey | None = None, rid: str, sig_nonce: str,
                    header_nonce: bool = True) -> tuple[dict, dict]:
    """The request and its signed 200 response carrying `doc`, as the server's middleware signs it.

    `header_nonce=False`: the server received no appliance-nonce header (it was stripped in transit).
    """
    target = f"/v1/attestation?nonce={nonce}"
    info = RequestInfo("GET", target, b"", nonce if header_nonce else None)
    body = json.dumps(doc, ensure_ascii=False).encode()
    headers = {"X-Request-Id": rid, **SECURITY_HEADERS, "Content-Type": "application/json", "Content-Length": str(len(body))}
    lower = {k.lower(): v for k, v in headers.items()}
    signed = identity(key or appliance_key(), sig_nonce).sign_response(info, 200, lower, body)
    request = {"method": "GET", "target": target, "headers": {NONCE_HEADER: nonce}, "nonce": nonce}
    return request, {"status": 200, "headers": {**headers, **signed}, "body_b64": b64(body)}


SIMULATED_POLICY = {"allow_simulated": True, "max_age_seconds": 300}

VALID_FACTORS = {
    "report-data": "pass",
    "evidence-signature": "skip",
    "provider": "pass",
    "claims": "pass",
    "nonce": "pass",
    "freshness": "pass",
    "binary": "skip",
    "models": "skip",
    "event-log": "skip",
    "signing-key": "pass",
    "response-signature": "pass",
}


def vector(name: str, description: str, doc: dict | None, *, nonce: str = NONCE, now: int = NOW, policy: dict | None = None,
           request: dict | None = None, response: dict | None = None, failed: list[str] | None = None,
           error: str | None = None, factors: dict | None = None) -> dict:
    v = {
        "name": name,
        "description": description,
        "kind": "attestation",
        "format": "simulated-v1",
        "nonce": nonce,
        "now": now,
        "policy": SIMULATED_POLICY if policy is None else policy,
    }
    if request is not None:
        v["request"] = request
        v["response"] = response
    if doc is not None:
        v["document"] = doc
    if failed is None:
        v["expect"] = {"ok": True, "factors": factors}
    else:
        v["expect"] = {"ok": False, "failed": failed, "error": error}
    return v


def build() -> dict[str, dict]:
    out: dict[str, dict] = {}

    def add(v: dict) -> None:
        assert v["name"].startswith(PREFIX) and v["name"] not in out, v["name"]
        out[v["name"]] = v

    good_claims = claims()
    raw = good_claims.encode()
    good = document(raw)
    req, resp = signed_response(good, NONCE, rid="vec-attest-0001", sig_nonce="attestation-sig-nonce-0001")

    add(vector(
        f"{PREFIX}valid", "A simulated-v1 attestation of one appliance with one model, fetched with NONCE, as the server "
        "serves and signs it. Verifies with allow_simulated; TCB-like factors are skipped, never passed.",
        good, request=req, response=resp, factors=VALID_FACTORS,
    ))
    add(vector(
        f"{PREFIX}wrong-nonce", "The valid document, checked by a client that sent another nonce (a replayed attestation).",
        good, nonce=OTHER_NONCE, failed=["nonce"], error="another nonce",
    ))
    altered = canonical_json({**json.loads(raw), "timestamp": TIMESTAMP + 1})
    assert altered != raw and len(altered) == len(raw)
    add(vector(
        f"{PREFIX}report-data-mismatch", "claims_b64 altered (timestamp + 1, still canonical), the evidence unchanged: the "
        "evidence's report data no longer binds the claims.",
        document(altered, evidence=base64.b64decode(good["evidence_b64"])), failed=["report-data"],
        error="does not match the claims",
    ))
    reencoded = json.dumps(json.loads(raw), indent=1).encode()
    add(vector(
        f"{PREFIX}claims-not-canonical", "The claims re-encoded (indented JSON, same values) and evidence made over those "
        "bytes: the report data matches, but claims must be exactly canonical JSON.",
        document(reencoded), failed=["claims"], error="not in canonical form",
    ))
    add(vector(
        f"{PREFIX}evidence-truncated-base64", "evidence_b64 cut short by three characters: not valid base64.",
        {**good, "evidence_b64": good["evidence_b64"][:-3]}, failed=["document"], error="evidence_b64 is not base64",
    ))
    sim = json.loads(SimulatedProvider().evidence(report_data(raw)).data)
    sim["padding"] = "A" * MAX_EVIDENCE_BYTES
    big = json.dumps(sim, sort_keys=True, separators=(",", ":")).encode()
    assert len(big) > MAX_EVIDENCE_BYTES
    add(vector(
        f"{PREFIX}evidence-oversized", f"Evidence of {len(big)} bytes, over the verifier's {MAX_EVIDENCE_BYTES}-byte limit "
        "(refused before it is parsed).",
        document(raw, evidence=big), failed=["document"], error=f"evidence_b64 larger than {MAX_EVIDENCE_BYTES} bytes",
    ))
    add(vector(
        f"{PREFIX}not-allowed", "The valid document under a policy without allow_simulated (the default): simulated "
        "evidence proves nothing, so it is refused.",
        good, policy={"max_age_seconds": 300}, failed=["provider"], error="SIMULATED",
    ))
    add(vector(
        f"{PREFIX}stale", "The valid document checked an hour after its timestamp, with max_age_seconds 300.",
        good, now=TIMESTAMP + 3600, failed=["freshness"], error="more than 300s",
    ))
    add(vector(
        f"{PREFIX}provider-mismatch", "The document says tdx; the evidence is simulated-v1.",
        {**good, "provider": "tdx"}, failed=["provider"], error="evidence is 'simulated'",
    ))
    add(vector(
        f"{PREFIX}unknown-format", "An evidence format no verifier knows.",
        {**good, "format": "simulated-v0"}, failed=["evidence-format"], error="unknown evidence format",
    ))
    add(vector(
        f"{PREFIX}binary-not-allowed", "A policy pinning another binary digest.",
        good, policy={**SIMULATED_POLICY, "binary_sha256": ["00" * 32]}, failed=["binary"], error="sha256",
    ))
    add(vector(
        f"{PREFIX}model-not-allowed", "A policy allowing only another model digest.",
        good, policy={**SIMULATED_POLICY, "model_sha256": ["11" * 32]}, failed=["models"], error="digests not allowed",
    ))
    add(vector(
        f"{PREFIX}model-missing", "A policy requiring a model the appliance does not serve.",
        good, policy={**SIMULATED_POLICY, "required_models": ["llama3-8b"]}, failed=["models"], error="missing ['llama3-8b']",
    ))
    # The response binding: the document is fine, the HTTP response around it is not.
    req2, resp2 = signed_response(good, NONCE, key=other_key(), rid="vec-attest-0002", sig_nonce="attestation-sig-nonce-0002")
    add(vector(
        f"{PREFIX}response-other-key", "The valid document, but its response signed by another key than the one the claims "
        "attest (a man in the middle terminating the connection).",
        good, request=req2, response=resp2, failed=["response-signature"], error="not signed by the attested key",
    ))
    body = base64.b64decode(resp["body_b64"])
    respaced = json.dumps(json.loads(body), ensure_ascii=False, indent=1).encode()
    add(vector(
        f"{PREFIX}response-body-reencoded", "The valid response with its JSON body re-serialized in transit (same values, "
        "other bytes): the body no longer matches the signed Content-Digest.",
        good, request=req, response={**resp, "body_b64": b64(respaced)}, failed=["response-signature"],
        error="content-digest",
    ))
    req3, resp3 = signed_response(good, NONCE, rid="vec-attest-0003", sig_nonce="attestation-sig-nonce-0003",
                                  header_nonce=False)
    add(vector(
        f"{PREFIX}response-nonce-stripped", "The appliance-nonce header stripped on the way in: the server signed a response "
        "bound to no nonce (the claims still carry the query's), and the client, which sent one, refuses it.",
        good, request=req, response=resp3, failed=["response-signature"], error="appliance-nonce",
    ))
    return out


def render(v: dict) -> bytes:
    return (json.dumps(v, indent=2, ensure_ascii=False) + "\n").encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = p.parse_args(argv)
    vectors = {name: render(v) for name, v in build().items()}
    if args.check:
        on_disk = {f.stem: f.read_bytes() for f in args.out.glob(f"{PREFIX}*.json")}
        bad = sorted(n for n in set(vectors) | set(on_disk) if vectors.get(n) != on_disk.get(n))
        if bad:
            print(f"differs from the script's output: {', '.join(bad)}", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob(f"{PREFIX}*.json"):
        if stale.stem not in vectors:
            stale.unlink()
    for name, data in vectors.items():
        (args.out / f"{name}.json").write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
