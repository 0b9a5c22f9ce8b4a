"""`nitro-cose-sign1`: an AWS Nitro Enclaves attestation document (NSM), COSE_Sign1 over CBOR.

The document (aws-nitro-enclaves-nsm-api docs/attestation_process.md; RFC 9052):

    COSE_Sign1 = [protected: bstr .cbor {1: -35 (ES384)}, unprotected: {}, payload: bstr, signature: bstr]
                 (optionally wrapped in CBOR tag 18)
    payload    = {module_id: tstr, digest: "SHA384", timestamp: uint (ms since the epoch),
                  pcrs: {index 0..31 => bstr (48 bytes)}, certificate: bstr (DER leaf),
                  cabundle: [bstr (DER root), ..., bstr (DER intermediate)],
                  public_key: bstr / nil, user_data: bstr / nil, nonce: bstr / nil}

Checks: the signature (ES384, raw r||s of 96 bytes) over Sig_structure
["Signature1", protected, b"", payload] with the leaf certificate's P-384 key; the chain
leaf <- cabundle[-1] <- ... <- cabundle[0], where cabundle[0] must be byte-identical to the pinned
AWS Nitro root G1 (SHA-256 of its DER 641a0321…bb5b; see `attestation.roots`) or to an extra root
from `policy.roots["aws"]`, every certificate valid at the document's timestamp (leaf
certificates live about three hours, so "now" would reject any stored document); `user_data`
must equal the expected 64 bytes (the appliance's binding: `nonce` and `public_key` may be
present but bind nothing); a debug-mode enclave reports PCR0, PCR1 and PCR2 as all zeros.

Current NSMs write the payload as an indefinite-length map (0xBF ... 0xFF); older ones as a
definite map (0xA9): both are accepted (the signature covers the exact payload bytes either way).

Runtime register: the appliance extends model digests into PCR16. The NSM lists only *locked*
PCRs in a document (AWS's spec: "map of all locked PCRs at the moment the attestation document
was generated"; QEMU's virtio-nsm model does the same), so PCR16 is attested only after the
appliance has locked it (`NitroProvider.seal()`). When PCR16 is absent `runtime_register` stays
None and a `runtime-register` factor says why.
"""

from __future__ import annotations

import hmac
import io
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

try:  # cbor2 is needed only to verify Nitro documents; the rest of the package works without it
    import cbor2
except ImportError:  # pragma: no cover
    _HAVE_CBOR2 = False
else:
    _HAVE_CBOR2 = True

from ..policy import Policy
from ..roots import RootsError, fingerprint, trusted_roots
from . import FormatResult, expect_measurements, register
from ._x509 import link_problem

__all__ = ["NitroFormat", "MAX_DOCUMENT_BYTES", "RUNTIME_PCR", "decode_document", "NitroFormatError"]

MAX_DOCUMENT_BYTES = 0x3000  # NSM_RESPONSE_MAX_SIZE: the NSM cannot answer with more
RUNTIME_PCR = 16
COSE_ALG_ES384 = -35
COSE_SIGN1_TAG = 18
_MAX_FIELD = 1024
_MAX_CABUNDLE = 8
_MAX_TIMESTAMP_MS = 253_402_300_799_000  # 9999-12-31T23:59:59Z


class NitroFormatError(ValueError):
    pass


def _decode_one(data: bytes, what: str) -> Any:
    """Exactly one CBOR item, no duplicate keys, shallow; trailing bytes refused. Indefinite-length
    items are allowed: the NSM itself writes the payload as an indefinite-length map (0xBF ... 0xFF)."""
    f = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(f, max_depth=8, allow_duplicate_keys=False).decode()
    except Exception as e:  # CBORDecodeError and whatever a semantic tag's decoder raises: never out
        raise NitroFormatError(f"{what} is not valid CBOR ({e.__class__.__name__})") from None
    if f.tell() != len(data):
        raise NitroFormatError(f"{what} has {len(data) - f.tell()} trailing bytes")
    return item


def _bstr(value: object, name: str, *, optional: bool = False, limit: int = _MAX_FIELD) -> bytes | None:
    if value is None and optional:
        return None
    if not isinstance(value, bytes):
        raise NitroFormatError(f"payload field {name} is not a byte string")
    if len(value) > limit:
        raise NitroFormatError(f"payload field {name} is larger than {limit} bytes")
    return value


def decode_document(evidence: bytes) -> dict[str, Any]:
    """Parse a COSE_Sign1 attestation document; raise NitroFormatError on anything malformed."""
    if not _HAVE_CBOR2:
        raise NitroFormatError("the cbor2 package is required to verify Nitro documents")
    if not isinstance(evidence, (bytes, bytearray)) or not evidence:
        raise NitroFormatError("empty document")
    if len(evidence) > MAX_DOCUMENT_BYTES:
        raise NitroFormatError(f"document is {len(evidence)} bytes, more than the NSM can produce ({MAX_DOCUMENT_BYTES})")
    outer = _decode_one(bytes(evidence), "document")
    if isinstance(outer, cbor2.CBORTag):
        if outer.tag != COSE_SIGN1_TAG:
            raise NitroFormatError(f"document has CBOR tag {outer.tag}, not COSE_Sign1 (18)")
        outer = outer.value
    if not isinstance(outer, (list, tuple)) or len(outer) != 4:
        raise NitroFormatError("document is not a COSE_Sign1 array of four items")
    protected, unprotected, payload, signature = outer
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise NitroFormatError("COSE_Sign1 protected header, payload and signature must be byte strings")
    if not isinstance(unprotected, Mapping):
        raise NitroFormatError("COSE_Sign1 unprotected header is not a map")
    headers = _decode_one(protected, "protected header")
    if not isinstance(headers, Mapping) or headers.get(1) != COSE_ALG_ES384 or isinstance(headers.get(1), bool):
        raise NitroFormatError("protected header does not name ES384 (alg -35)")
    body = _decode_one(payload, "payload")
    if not isinstance(body, Mapping) or not all(isinstance(k, str) for k in body):
        raise NitroFormatError("payload is not a map with text keys")

    module_id = body.get("module_id")
    if not isinstance(module_id, str) or not module_id or len(module_id) > _MAX_FIELD:
        raise NitroFormatError("payload field module_id missing or malformed")
    if body.get("digest") != "SHA384":
        raise NitroFormatError(f"payload digest is {body.get('digest')!r}, expected 'SHA384'")
    ts = body.get("timestamp")
    if not isinstance(ts, int) or isinstance(ts, bool) or not 0 < ts < _MAX_TIMESTAMP_MS:
        raise NitroFormatError("payload field timestamp missing or malformed")
    pcrs = body.get("pcrs")
    if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= 32:
        raise NitroFormatError("payload field pcrs missing or malformed")
    out_pcrs: dict[int, bytes] = {}
    for k, v in pcrs.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= 31:
            raise NitroFormatError(f"PCR index {k!r} is out of range")
        if not isinstance(v, bytes) or len(v) != 48:
            raise NitroFormatError(f"PCR{k} is not a 48-byte SHA-384 value")
        out_pcrs[k] = v
    cert = _bstr(body.get("certificate"), "certificate", limit=4096)
    bundle = body.get("cabundle")
    if not isinstance(bundle, (list, tuple)) or not 1 <= len(bundle) <= _MAX_CABUNDLE:
        raise NitroFormatError("payload field cabundle missing or malformed")
    bundle = [_bstr(c, "cabundle", limit=4096) for c in bundle]
    return {
        "protected": protected,
        "payload": payload,
        "signature": signature,
        "module_id": module_id,
        "timestamp_ms": ts,
        "pcrs": out_pcrs,
        "certificate": cert,
        "cabundle": bundle,
        "public_key": _bstr(body.get("public_key"), "public_key", optional=True),
        "user_data": _bstr(body.get("user_data"), "user_data", optional=True),
        "nonce": _bstr(body.get("nonce"), "nonce", optional=True),
    }


def _load_cert(der: bytes) -> x509.Certificate:
    """Parse a DER certificate completely now; ValueError for anything malformed."""
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.public_key(), cert.extensions, cert.subject, cert.issuer
        cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
        return cert
    except ValueError:
        raise
    except Exception as e:  # InvalidVersion, UnsupportedAlgorithm, ...: untrusted bytes never raise out
        raise ValueError(f"malformed certificate ({e.__class__.__name__})") from None


class NitroFormat:
    format = "nitro-cose-sign1"

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult:
        result = FormatResult(provider="nitro")
        try:
            doc = decode_document(evidence)
            leaf = _load_cert(doc["certificate"])
            bundle = [_load_cert(c) for c in doc["cabundle"]]
        except NitroFormatError as e:
            result.add("evidence-format", "fail", str(e))
            return result
        except ValueError:
            result.add("evidence-format", "fail", "a certificate in the document does not parse")
            return result
        pcrs = doc["pcrs"]
        result.add("evidence-format", "pass", f"Nitro attestation document from {doc['module_id']}, {len(pcrs)} PCRs")
        result.measurements = {f"pcr{i}": v.hex() for i, v in sorted(pcrs.items())}

        # 1. COSE signature by the leaf certificate's key.
        key = leaf.public_key()
        sig = doc["signature"]
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            result.add("evidence-signature", "fail", "the signing certificate's key is not ECDSA P-384")
        elif len(sig) != 96:
            result.add("evidence-signature", "fail", f"ES384 signature must be 96 bytes, got {len(sig)}")
        else:
            to_be_signed = cbor2.dumps(["Signature1", doc["protected"], b"", doc["payload"]])
            der_sig = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
            try:
                key.verify(der_sig, to_be_signed, ec.ECDSA(hashes.SHA384()))
            except InvalidSignature:
                result.add("evidence-signature", "fail", "COSE_Sign1 signature does not verify")
            else:
                result.add("evidence-signature", "pass", "COSE_Sign1 (ES384) signed by the enclave's certificate")

        # 2. The chain, at the document's time, back to a trusted root.
        self._chain(result, leaf, bundle, doc, policy)

        # 3. The binding: user_data is the expected report data.
        ud = doc["user_data"]
        ok = isinstance(report_data, bytes) and len(report_data) == 64 and ud is not None and hmac.compare_digest(ud, report_data)
        detail = "user_data binds these claims" if ok else "user_data is absent" if ud is None else "user_data does not match the claims"
        result.add("report-data", "pass" if ok else "fail", detail)

        # 4. Debug mode: PCR0..2 all zeros.
        image = [pcrs.get(i) for i in (0, 1, 2)]
        if any(v is None for v in image):
            result.add("debug", "fail", "PCR0, PCR1 or PCR2 missing: cannot tell a debug-mode enclave")
        elif all(v == bytes(48) for v in image):
            allowed = bool(getattr(policy, "allow_debug", False))
            why = " (allowed by policy)" if allowed else ": its memory and console are open to the parent"
            result.add("debug", "pass" if allowed else "fail", "enclave runs in DEBUG mode (PCR0-2 are zero)" + why)
        else:
            result.add("debug", "pass", "enclave is not in debug mode")

        expect_measurements(result, getattr(policy, "nitro", None) or {}, "Nitro")
        result.add("tcb-status", "skip", "not applicable: Nitro has no TCB collateral (the short-lived chain is the freshness)")

        if RUNTIME_PCR in pcrs:
            result.runtime_register = pcrs[RUNTIME_PCR]
        else:
            result.add("runtime-register", "skip", f"PCR{RUNTIME_PCR} is not in the document (the NSM lists only locked PCRs)")
        return result

    @staticmethod
    def _chain(
        result: FormatResult, leaf: x509.Certificate, bundle: list[x509.Certificate], doc: dict[str, Any], policy: Policy
    ) -> None:
        when = datetime.fromtimestamp(doc["timestamp_ms"] / 1000, tz=UTC)
        try:
            roots = trusted_roots("aws", policy)
        except RootsError as e:
            result.add("certificate-chain", "fail", f"extra AWS root from the policy is unusable: {e}")
            return
        first = bundle[0].public_bytes(Encoding.DER)
        name = next((n for n, c in roots if hmac.compare_digest(c.public_bytes(Encoding.DER), first)), None)
        if name is None:
            result.add("certificate-chain", "fail", f"cabundle starts at an untrusted root (sha256 {fingerprint(bundle[0])})")
            return
        chain = bundle + [leaf]  # root, intermediates..., leaf
        why = link_problem(bundle[0], bundle[0], when)
        for issuer, child in zip(chain, chain[1:]):
            if why:
                break
            why = link_problem(child, issuer, when)
        if why:
            result.add("certificate-chain", "fail", why)
        else:
            result.add("certificate-chain", "pass", f"{len(bundle) - 1} intermediate(s) to {name}, valid at {when.isoformat()}")


register(NitroFormat())
