#!/usr/bin/env python3
"""Regenerate spec/vectors/attestation/: the attestation test vectors of spec/attestation.md.

    .venv/bin/python scripts/make-attestation-vectors.py [--out DIR] [--check]

Deterministic: fixed digests, nonce and times, the published RFC 9421 `test-key-ed25519` as the
appliance's signing key, and Ed25519 signatures are deterministic (RFC 8032). Claims, report data
and simulated evidence go through the appliance's own code (`attestation.claims.Claims`,
`attestation.claims.report_data`, `appliance.evidence.SimulatedProvider`, `appliance.trust.identity`);
the document is assembled as `appliance.web.resources.attestation.Attestation` assembles it. `--check`
compares with what is on disk instead of writing (exit 1 on a difference).

Hardware formats (`tdx-*`, `sgx-*`, `snp-*`, `nitro-*`): the byte-exact evidence is built by the test
fixtures (tests/fixtures/tee/intel.py, amd.py, nitro.py) and signed by test PKIs whose keys are
derived from fixed seeds (tests/fixtures/tee/seeded.py), with RFC 6979 ECDSA and seed-derived
RSASSA-PSS salts, so every byte is reproducible. Their roots are written to `roots/test-*.pem`
(test roots only: they chain nothing real) and named by each vector's `policy.roots`.

The script owns the files whose names start with one of OWNED_PREFIXES, and `roots/test-*.pem`;
`--check` compares exactly those, and a run deletes stale ones among them, never other files.
"""

from __future__ import annotations

import argparse
import base64
import functools
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cbor2  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives.serialization import load_der_private_key  # noqa: E402

from appliance.evidence import SimulatedProvider  # noqa: E402
from appliance.trust.identity import Identity  # noqa: E402
from attestation.claims import Claims, ModelClaim, canonical_json, report_data  # noqa: E402
from attestation.measurements import event_digest, model_event, replay  # noqa: E402
from attestation.signing import NONCE_HEADER, RequestInfo  # noqa: E402
from attestation.verify import MAX_EVIDENCE_BYTES  # noqa: E402
from tests.fixtures.tee import amd, intel  # noqa: E402
from tests.fixtures.tee import nitro as nsm  # noqa: E402

OUT = ROOT / "spec" / "vectors" / "attestation"
PREFIX = "simulated-"  # the simulated-v1 vectors
OWNED_PREFIXES = ("simulated-", "tdx-", "sgx-", "snp-", "nitro-")  # every vector this script owns starts with one
ROOTS_DIR = "roots"  # under OUT: the test roots the hardware vectors name (roots/test-*.pem, owned too)

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


def event_log(register: str = "none", *, sha256: str = MODEL_SHA256) -> list[dict]:
    """What the appliance logs loading MODEL: on a provider without a runtime register ("none":
    simulated, SEV-SNP, SGX) nothing is extended; on TDX ("rtmr3") and Nitro ("pcr16") it is."""
    ev = model_event(MODEL, sha256)
    return [{"register": register, "algorithm": "sha384", "digest": event_digest(ev).hex(), "event": ev,
             "extended": register != "none"}]


def claims(nonce: str = NONCE, *, timestamp: int = TIMESTAMP, key: Ed25519PrivateKey | None = None,
           provider: str = "simulated", log: list[dict] | None = None, model_sha256: str = MODEL_SHA256,
           mmap: bool = False) -> Claims:
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
        provider=provider,
        models=(ModelClaim(MODEL, model_sha256, mmap=mmap),),
        tls_public_key_sha256=None,
        runtime_measurements=tuple(event_log() if log is None else log),
    )


def document(claims_bytes: bytes, *, evidence: bytes | None = None, claims_obj: dict | None = None,
             provider: str = "simulated", fmt: str = "simulated-v1", aux: bytes | None = None, log: list[dict] | None = None,
             **override) -> dict:
    """The document as the attestation resource serves it; evidence defaults to simulated evidence over the claims.
    `log` (default: the simulated provider's) is what the claims' runtime_measurements were made from."""
    rd = report_data(claims_bytes)
    if evidence is None:
        evidence = SimulatedProvider().evidence(rd).data
    doc = {
        "version": 1,
        "provider": provider,
        "format": fmt,
        "claims": claims_obj if claims_obj is not None else json.loads(claims_bytes),
        "claims_b64": b64(claims_bytes),
        "report_data": rd.hex(),
        "evidence_b64": b64(evidence),
        "aux_b64": b64(aux) if aux else None,
        "event_log": event_log() if log is None else log,
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
    "models-in-memory": "pass",
    "event-log": "skip",
    "signing-key": "pass",
    "response-signature": "pass",
}


def vector(name: str, description: str, doc: dict | None, *, nonce: str = NONCE, now: int = NOW, policy: dict | None = None,
           request: dict | None = None, response: dict | None = None, failed: list[str] | None = None,
           error: str | None = None, factors: dict | None = None, fmt: str = "simulated-v1") -> dict:
    v = {
        "name": name,
        "description": description,
        "kind": "attestation",
        "format": fmt,
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
    out = build_simulated()
    for name, v in build_hardware().items():
        assert name not in out, name
        out[name] = v
    return out


def build_simulated() -> dict[str, dict]:
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
    add(vector(
        f"{PREFIX}model-mapped", "The model is mapped from the host's disk (use_mmap), which can change it after it was "
        "hashed: the default policy refuses it (allow_mmap = false).",
        document(claims(mmap=True).encode()), failed=["models-in-memory"], error="mapped from the host's disk",
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


# --------------------------------------------------------------------------------------------------
# Hardware formats: TDX quote v4, SGX quote v3, SEV-SNP report (+ certificate table), Nitro COSE_Sign1


HW_TIMESTAMP = 1_750_000_000  # 2025-06-15T15:06:40Z: inside every test PKI's validity (the Nitro chain is made around it)
HW_NOW = HW_TIMESTAMP + 30
SEED = b"appliance attestation vectors v1"  # every test key below is derived from it (public: test keys only)
SWAPPED_MODEL_SHA256 = hashlib.sha256(b"appliance attestation vector swapped model").hexdigest()
ZERO48 = bytes(48)


@functools.cache
def intel_pki() -> intel.TestPKI:
    return intel.make_pki(seed=SEED + b"/intel")


@functools.cache
def amd_pki() -> amd.AmdPKI:
    return amd.make_pki(seed=SEED + b"/amd")


@functools.cache
def nitro_pki() -> nsm.NitroPKI:
    return nsm.make_pki(HW_TIMESTAMP, seed=SEED + b"/aws")


def pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def root_files() -> dict[str, bytes]:
    """roots/<name> -> PEM: the test roots the hardware vectors name in policy.roots."""
    return {
        f"{ROOTS_DIR}/test-intel-sgx-root.pem": pem(intel_pki().root),
        f"{ROOTS_DIR}/test-amd-ark.pem": pem(amd_pki().ark),
        f"{ROOTS_DIR}/test-aws-nitro-root.pem": pem(nitro_pki().root),
    }


def runtime_value(log: list[dict]) -> bytes:
    """The runtime register (RTMR3, PCR16) after the log's extended events: what the hardware holds."""
    return replay([e["event"] for e in log if e["extended"]])


def tdx_evidence(rd: bytes, *, debug: bool = False, runtime: bytes = ZERO48) -> tuple[bytes, None]:
    rtmrs = (*intel.RTMRS[:3], runtime)
    return intel.tdx_quote(rd, debug=debug, rtmrs=rtmrs, pki=intel_pki(), seed=SEED + b"/tdx"), None


def sgx_evidence(rd: bytes, *, debug: bool = False, runtime: bytes = ZERO48) -> tuple[bytes, None]:
    return intel.sgx_quote(rd, debug=debug, pki=intel_pki(), seed=SEED + b"/sgx"), None


def snp_evidence(rd: bytes, *, debug: bool = False, runtime: bytes = ZERO48) -> tuple[bytes, bytes]:
    policy = amd.POLICY | (amd.POLICY_DEBUG if debug else 0)
    report = amd.make_report(rd, key=amd_pki().vcek_key, policy=policy, deterministic=True)
    return report, amd.aux_for(amd_pki())  # the extended report's certificate table: VCEK, ASK, ARK


def nitro_evidence(rd: bytes, *, debug: bool = False, runtime: bytes = ZERO48) -> tuple[bytes, None]:
    """As the NSM answers once the appliance has locked PCR16: PCR0..15 and PCR16, the payload an
    indefinite-length map. Debug mode: the image PCRs are all zero."""
    p = nitro_pki()
    pcrs = {i: (ZERO48 if debug else nsm.IMAGE_PCRS.get(i, ZERO48)) for i in range(16)}
    pcrs[16] = runtime
    body = nsm.payload(p, user_data=rd, pcrs=pcrs, timestamp_ms=HW_TIMESTAMP * 1000)
    raw = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in body.items()) + b"\xff"
    return nsm.sign_document(p, raw, deterministic=True), None


def _flip(data: bytes, offset: int) -> bytes:
    b = bytearray(data)
    b[offset] ^= 0x01
    return bytes(b)


# What each format's vectors need. `flip`: the offset of one byte of the hardware signature itself.
HARDWARE = {
    "tdx": {
        "provider": "tdx", "format": "tdx-quote-v4", "register": "rtmr3", "vendor": "intel",
        "root": "test-intel-sgx-root.pem", "evidence": tdx_evidence, "section": "tdx",
        "pinned": {"mrtd": intel.MRTD.hex(), "rtmr0": intel.RTMRS[0].hex()},
        "wrong": {"mrtd": hashlib.sha384(b"appliance attestation vector: another TD").hexdigest()},
        "flip": lambda ev: intel.offsets(ev)["signature"],
        "what": "TDX quote v4", "signature": "the quote signature (ECDSA P-256, by the attestation key)",
        "errors": {"report-data": "REPORTDATA does not match the claims", "debug": "debug TD",
                   "certificate-chain": "not a pinned Intel root",
                   "evidence-signature": "quote signature does not verify under the attestation key",
                   "evidence-format": "truncated in signature data", "measurements": "mrtd differ from the policy"},
        "debug_what": "TDATTRIBUTES.DEBUG set (a debug TD)",
    },
    "sgx": {
        "provider": "gramine-sgx", "format": "sgx-quote-v3", "register": "none", "vendor": "intel",
        "root": "test-intel-sgx-root.pem", "evidence": sgx_evidence, "section": "sgx",
        "pinned": {"mrenclave": intel.MRENCLAVE.hex(), "mrsigner": intel.MRSIGNER.hex()},
        "wrong": {"mrenclave": hashlib.sha256(b"appliance attestation vector: another enclave").hexdigest()},
        "flip": lambda ev: intel.offsets(ev)["signature"],
        "what": "SGX quote v3 (Gramine DCAP)", "signature": "the quote signature (ECDSA P-256, by the attestation key)",
        "errors": {"report-data": "REPORTDATA does not match the claims", "debug": "debug enclave",
                   "certificate-chain": "not a pinned Intel root",
                   "evidence-signature": "quote signature does not verify under the attestation key",
                   "evidence-format": "truncated in signature data", "measurements": "mrenclave differ from the policy"},
        "debug_what": "ATTRIBUTES.DEBUG set (a debug enclave)",
    },
    "snp": {
        "provider": "sev-snp", "format": "sev-snp-report", "register": "none", "vendor": "amd",
        "root": "test-amd-ark.pem", "evidence": snp_evidence, "section": "sev_snp",
        "pinned": {"measurement": amd.MEASUREMENT.hex()},
        "wrong": {"measurement": hashlib.sha384(b"appliance attestation vector: another guest").hexdigest()},
        "flip": lambda ev: 0x2A0,
        "what": "SEV-SNP report v3 with its certificate table (VCEK, ASK, ARK) in aux",
        "signature": "the report signature (ECDSA P-384 by the VCEK; R at 0x2A0)",
        "errors": {"report-data": "REPORT_DATA does not match the claims", "debug": "guest policy allows DEBUG",
                   "certificate-chain": "ASK is not issued by a pinned AMD ARK or a policy root",
                   "evidence-signature": "report signature does not verify with the VCEK",
                   "evidence-format": "an SEV-SNP report is exactly 1184 bytes", "measurements": "measurement differ from the policy"},
        "debug_what": "guest POLICY bit 19 (DEBUG) set",
    },
    "nitro": {
        "provider": "nitro", "format": "nitro-cose-sign1", "register": "pcr16", "vendor": "aws",
        "root": "test-aws-nitro-root.pem", "evidence": nitro_evidence, "section": "nitro",
        "pinned": {f"pcr{i}": nsm.IMAGE_PCRS[i].hex() for i in (0, 1, 2)},
        "wrong": {"pcr0": hashlib.sha384(b"appliance attestation vector: another enclave image").hexdigest()},
        "flip": lambda ev: len(ev) - 1,
        "what": "Nitro attestation document (COSE_Sign1, ES384) with PCR16 locked",
        "signature": "the COSE_Sign1 signature (ES384 by the enclave's leaf certificate; its last byte)",
        "errors": {"report-data": "user_data does not match the claims", "debug": "DEBUG mode",
                   "certificate-chain": "cabundle starts at an untrusted root",
                   "evidence-signature": "COSE_Sign1 signature does not verify",
                   "evidence-format": "document is not valid CBOR", "measurements": "pcr0 differ from the policy"},
        "debug_what": "PCR0, PCR1 and PCR2 all zero (an enclave started in debug mode)",
    },
}


def hardware_factors(kind: str) -> dict[str, str]:
    """Every factor a valid vector of `kind` reports, and its status."""
    runtime = HARDWARE[kind]["register"] != "none"
    return {
        "evidence-format": "pass", "evidence-signature": "pass", "certificate-chain": "pass", "report-data": "pass",
        "debug": "pass", "measurements": "pass", "tcb-status": "skip",
        "provider": "pass", "claims": "pass", "nonce": "pass", "freshness": "pass",
        "binary": "skip", "models": "skip", "models-in-memory": "pass", "event-log": "pass" if runtime else "skip", "signing-key": "pass",
    }


def build_hardware() -> dict[str, dict]:
    out: dict[str, dict] = {}
    for kind, h in HARDWARE.items():
        def add(suffix: str, description: str, doc: dict, **kw) -> None:
            name = f"{kind}-{suffix}"
            assert name.startswith(OWNED_PREFIXES) and name not in out, name
            out[name] = vector(name, description, doc, fmt=h["format"], now=HW_NOW, **kw)

        provider, fmt, register, make = h["provider"], h["format"], h["register"], h["evidence"]
        roots = {h["vendor"]: f"{ROOTS_DIR}/{h['root']}"}
        policy = {"max_age_seconds": 300, "roots": roots, h["section"]: h["pinned"]}
        no_pins = {"max_age_seconds": 300, "roots": roots}
        err = h["errors"]
        pinned = ", ".join(sorted(h["pinned"]))

        def doc_for(log: list[dict], *, model_sha256: str = MODEL_SHA256, debug: bool = False,
                    runtime: bytes | None = None, mangle=None) -> tuple[dict, bytes]:
            """The document for claims with `log`; the hardware's runtime register holds `runtime`
            (default: the log's replay) and `mangle` alters the evidence after it was made."""
            raw = claims(timestamp=HW_TIMESTAMP, provider=provider, log=log, model_sha256=model_sha256).encode()
            evidence, aux = make(report_data(raw), debug=debug, runtime=runtime_value(log) if runtime is None else runtime)
            if mangle is not None:
                evidence = mangle(evidence)
            return document(raw, evidence=evidence, provider=provider, fmt=fmt, aux=aux, log=log), raw

        log = event_log(register)
        good, raw = doc_for(log)
        runtime_note = {
            "rtmr3": " The model load is extended into RTMR3, and the event log replays to it.",
            "pcr16": " The model load is extended into PCR16, which is locked and so in the document; the event log replays to it.",
        }.get(register, " This platform has no runtime register: the event log is not replayed (skip).")
        add("valid", f"A {h['what']} binding the claims of one appliance with one model, fetched with NONCE, signed "
            f"by a test PKI whose root is named by policy.roots.{h['vendor']}; the policy pins {pinned}." + runtime_note
            + " TCB status needs online collateral: skipped, never passed.",
            good, policy=policy, factors=hardware_factors(kind))
        add("wrong-nonce", "The valid document, checked by a client that sent another nonce (a replayed attestation).",
            good, nonce=OTHER_NONCE, policy=policy, failed=["nonce"], error="another nonce")
        altered = canonical_json({**json.loads(raw), "timestamp": HW_TIMESTAMP + 1})
        assert altered != raw and len(altered) == len(raw)
        add("report-data-mismatch", "claims_b64 altered (timestamp + 1, still canonical), the evidence unchanged: the "
            "report data the hardware signed no longer binds the claims.",
            document(altered, evidence=base64.b64decode(good["evidence_b64"]), provider=provider, fmt=fmt,
                     aux=base64.b64decode(good["aux_b64"]) if good["aux_b64"] else None, log=log),
            policy=policy, failed=["report-data"], error=err["report-data"])
        debug_doc, _ = doc_for(log, debug=True)
        debug_policy = no_pins if kind == "nitro" else policy
        note = " (the policy pins no PCRs here, so only the debug factor fails)" if kind == "nitro" else ""
        add("debug", f"Evidence from a debug TEE: {h['debug_what']}, correctly signed, without allow_debug{note}.",
            debug_doc, policy=debug_policy, failed=["debug"], error=err["debug"])
        add("untrusted-root", "The valid document under a policy without the test root (no policy.roots): the chain "
            "ends at a root that is not pinned.",
            good, policy={k: v for k, v in policy.items() if k != "roots"}, failed=["certificate-chain"],
            error=err["certificate-chain"])
        flipped = _flip(base64.b64decode(good["evidence_b64"]), h["flip"](base64.b64decode(good["evidence_b64"])))
        add("bad-signature", f"The valid evidence with one byte of {h['signature']} flipped.",
            {**good, "evidence_b64": b64(flipped)}, policy=policy, failed=["evidence-signature"], error=err["evidence-signature"])
        ev_bytes = base64.b64decode(good["evidence_b64"])
        cut = 0x2A0 if kind == "snp" else len(ev_bytes) // 2
        what_cut = "cut after its signed part (the signature missing)" if kind == "snp" else f"cut to its first {cut} bytes"
        add("evidence-truncated", f"The valid evidence ({len(ev_bytes)} bytes) {what_cut}: it does not parse.",
            {**good, "evidence_b64": b64(ev_bytes[:cut])}, policy=policy, failed=["evidence-format"],
            error=err["evidence-format"])
        wrong = ", ".join(sorted(h["wrong"]))
        add("measurement-mismatch", f"The valid document under a policy pinning another {wrong} than the evidence reports.",
            good, policy={**policy, h["section"]: {**h["pinned"], **h["wrong"]}}, failed=["measurements"],
            error=err["measurements"])
        if register != "none":
            swapped = event_log(register, sha256=SWAPPED_MODEL_SHA256)
            reg = register.upper()
            mismatch, _ = doc_for(swapped, model_sha256=SWAPPED_MODEL_SHA256, runtime=runtime_value(log))
            add("event-log-mismatch", f"The claims (and their event log) name another digest for the model than the one "
                f"{reg} was extended with: the evidence binds these claims and the log names every claimed model, but "
                f"replaying the log does not give {reg} (a model swapped after it was measured).",
                mismatch, policy=policy, failed=["event-log"], error="replayed to another value")
    return out


def render(v: dict) -> bytes:
    return (json.dumps(v, indent=2, ensure_ascii=False) + "\n").encode()


def outputs() -> dict[str, bytes]:
    """Every file this script makes, by path relative to the vector directory."""
    files = {f"{name}.json": render(v) for name, v in build().items()}
    files.update(root_files())
    return files


def owned(directory: Path) -> dict[str, bytes]:
    """The files under `directory` this script owns (and may rewrite or delete)."""
    paths = [f for f in directory.glob("*.json") if f.name.startswith(OWNED_PREFIXES)]
    paths += list(directory.glob(f"{ROOTS_DIR}/test-*.pem"))
    return {f.relative_to(directory).as_posix(): f.read_bytes() for f in paths}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--check", action="store_true", help="compare with the files on disk; write nothing")
    args = p.parse_args(argv)
    files = outputs()
    if args.check:
        on_disk = owned(args.out) if args.out.is_dir() else {}
        bad = sorted(n for n in set(files) | set(on_disk) if files.get(n) != on_disk.get(n))
        if bad:
            print(f"differs from the script's output: {', '.join(bad)}", file=sys.stderr)
            return 1
        return 0
    (args.out / ROOTS_DIR).mkdir(parents=True, exist_ok=True)
    for stale in owned(args.out):
        if stale not in files:
            (args.out / stale).unlink()
    for name, data in files.items():
        (args.out / name).write_bytes(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
