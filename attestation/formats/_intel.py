"""Intel ECDSA (DCAP) quotes: the byte layout shared by TDX quote v4 and SGX quote v3, and what can
be verified offline.

    header (48 B)     version u16, attestation key type u16 (2 = ECDSA P-256), TEE type u32
                      (0x00 SGX, 0x81 TDX), QE SVN/reserved u16, PCE SVN u16, QE vendor id 16 B,
                      user data 20 B
    body              SGX ISV enclave report (384 B) or TDX TD report (584 B)
    sig_data_len u32, then the signature data:
      v3 (SGX)        signature (64 B, r||s big-endian) over header||body, attestation key (64 B,
                      x||y), QE report (384 B), QE report signature (64 B), QE auth data
                      (u16 length + bytes), certification data (u16 type = 5, u32 size, PEM chain)
      v4 (TDX)        signature (64 B), attestation key (64 B), certification data (u16 type = 6,
                      u32 size) holding the QE report (384 B), QE report signature (64 B), QE auth
                      data (u16 length + bytes) and nested certification data (type 5, PEM chain)

All integers are little-endian. Every declared size must fit its container exactly; bytes after the
signature data are tolerated only when they are all zero (quote buffers are often zero-padded, and
the padding is not signed: it carries nothing).

Offline checks: the quote signature under the attestation key; the QE report signature under the
PCK leaf key; the QE report's REPORTDATA = SHA-256(attestation key || QE auth data) || 32 zero
bytes; the PCK chain (leaf <- intermediate <- root), each link's signature, issuer name, CA flag
and validity at `now`, with the root pinned by the SHA-256 of its DER (attestation.roots, plus
`policy.roots["intel"]`). What needs Intel PCS collateral fetched online -- TCB status (TCB info),
QE identity, PCK and root CRLs -- is not checked here and is reported as a skipped factor.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from .. import roots as _roots
from ..policy import Policy
from . import FormatResult

__all__ = [
    "HEADER_LEN",
    "SGX_REPORT_LEN",
    "TDX_REPORT_LEN",
    "MAX_QUOTE_BYTES",
    "TEE_TYPE_SGX",
    "TEE_TYPE_TDX",
    "QuoteError",
    "Quote",
    "parse_quote",
    "check_signatures",
    "check_report_data",
    "check_debug",
    "verify_pck_chain",
    "tcb_skipped",
]

HEADER_LEN = 48
SGX_REPORT_LEN = 384
TDX_REPORT_LEN = 584
SIG_LEN = 64
KEY_LEN = 64
MAX_QUOTE_BYTES = 64 * 1024
ATT_KEY_ECDSA_P256 = 2
TEE_TYPE_SGX = 0x00000000
TEE_TYPE_TDX = 0x00000081
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
# SGX report body offsets (also the layout of the QE report).
SGX_ATTRIBUTES = 48
SGX_MRENCLAVE = 64
SGX_MRSIGNER = 128
SGX_ISVPRODID = 256
SGX_ISVSVN = 258
SGX_REPORTDATA = 320


# What cryptography raises for certificates that parse only partly (bad version, odd keys, ...).
_CERT_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion)


class QuoteError(ValueError):
    """The bytes are not a well-formed quote of the expected kind; the message says where."""


@dataclass(frozen=True)
class Quote:
    version: int
    tee_type: int
    header: bytes
    body: bytes
    signature: bytes
    attestation_key: bytes
    qe_report: bytes
    qe_report_signature: bytes
    qe_auth_data: bytes
    pck_chain_pem: bytes
    padding: int  # zero bytes after the signature data

    @property
    def signed(self) -> bytes:
        """What the attestation key signs: header || report body."""
        return self.header + self.body

    @property
    def qe_vendor_id(self) -> bytes:
        return self.header[12:28]


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int, field: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise QuoteError(f"{self.what}: truncated in {field} (needs {n} bytes at offset {self.pos}, has {len(self.data) - self.pos})")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self, field: str) -> int:
        return int(struct.unpack("<H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack("<I", self.take(4, field))[0])

    def rest(self) -> bytes:
        return self.data[self.pos :]


def _cert_data(r: _Reader, expect_type: int, where: str) -> bytes:
    ctype = r.u16(f"{where} certification data type")
    if ctype != expect_type:
        raise QuoteError(f"{r.what}: {where} certification data type {ctype}, expected {expect_type}")
    size = r.u32(f"{where} certification data size")
    return r.take(size, f"{where} certification data")


def parse_quote(data: bytes, *, version: int, tee_type: int, body_len: int) -> Quote:
    """Parse exactly one quote of `version` and `tee_type`; QuoteError for anything else."""
    what = f"quote v{version}"
    if not isinstance(data, (bytes, bytearray)):
        raise QuoteError(f"{what}: evidence is not bytes")
    data = bytes(data)
    if len(data) > MAX_QUOTE_BYTES:
        raise QuoteError(f"{what}: {len(data)} bytes, more than the {MAX_QUOTE_BYTES} allowed")
    r = _Reader(data, what)
    header = r.take(HEADER_LEN, "header")
    ver, key_type, tee = struct.unpack_from("<HHI", header, 0)
    if ver != version:
        raise QuoteError(f"{what}: version {ver}, expected {version}")
    if key_type != ATT_KEY_ECDSA_P256:
        raise QuoteError(f"{what}: attestation key type {key_type}, only 2 (ECDSA P-256) is supported")
    if tee != tee_type:
        raise QuoteError(f"{what}: TEE type {tee:#x}, expected {tee_type:#x}")
    body = r.take(body_len, "report body")
    sig_len = r.u32("signature data length")
    s = _Reader(r.take(sig_len, "signature data"), f"{what} signature data")
    signature = s.take(SIG_LEN, "quote signature")
    key = s.take(KEY_LEN, "attestation key")
    if version == 3:
        qe = s
    else:
        qe = _Reader(_cert_data(s, CERT_QE_REPORT, "QE report"), f"{what} QE report certification data")
    qe_report = qe.take(SGX_REPORT_LEN, "QE report")
    qe_sig = qe.take(SIG_LEN, "QE report signature")
    auth = qe.take(qe.u16("QE auth data length"), "QE auth data")
    pem = _cert_data(qe, CERT_PCK_CHAIN, "PCK")
    if qe.rest():
        raise QuoteError(f"{qe.what}: {len(qe.rest())} unexpected bytes after the PCK certificate chain")
    if version != 3 and s.rest():
        raise QuoteError(f"{s.what}: {len(s.rest())} unexpected bytes after the certification data")
    tail = r.rest()
    if tail.strip(b"\x00"):
        raise QuoteError(f"{what}: {len(tail)} bytes after the signature data that are not zero padding")
    return Quote(ver, tee, header, body, signature, key, qe_report, qe_sig, auth, pem, len(tail))


# --------------------------------------------------------------------------------------------------
# Signatures and the PCK certificate chain


def _p256_key(raw: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)
    except ValueError:
        return None


def _verify_raw(key: ec.EllipticCurvePublicKey, sig: bytes, message: bytes) -> bool:
    """ECDSA-SHA256 with a raw r||s (2 x 32 bytes, big-endian) signature."""
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    try:
        key.verify(der, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _short(cert: x509.Certificate) -> str:
    try:
        cn = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else cert.subject.rfc4514_string()
    except _CERT_ERRORS:
        return "?"


def _p256_of(cert: x509.Certificate | None) -> ec.EllipticCurvePublicKey | None:
    """The certificate's key if it is ECDSA P-256, else None (also for keys that do not parse)."""
    if cert is None:
        return None
    try:
        key = cert.public_key()
    except _CERT_ERRORS:
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        key = parent.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        algo = child.signature_hash_algorithm
        if algo is None:
            return False
        key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algo))
    except (InvalidSignature, *_CERT_ERRORS):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except (x509.ExtensionNotFound, *_CERT_ERRORS):
        return False


def verify_pck_chain(pem: bytes, trusted: dict[str, x509.Certificate], now: float) -> tuple[x509.Certificate | None, str | None, str]:
    """(PCK leaf, None, root fingerprint) for a good chain, else (the leaf if parseable, the reason, "")."""
    try:
        certs = x509.load_pem_x509_certificates(pem.rstrip(b"\x00"))
    except _CERT_ERRORS:
        return None, "PCK certificate chain is not PEM", ""
    try:
        leaf, error = _verify_chain(certs, trusted, now)
    except _CERT_ERRORS as e:  # a certificate that parses only partly
        return certs[0], f"malformed certificate in the PCK chain: {e}", ""
    return leaf, error, ("" if error else _roots.fingerprint(certs[-1]))


def _verify_chain(certs: list[x509.Certificate], trusted: dict[str, x509.Certificate], now: float) -> tuple[x509.Certificate, str | None]:
    """Checks the chain, appending the trusted root to `certs` when the chain stops below it."""
    leaf = certs[0]
    if len(certs) > 3:
        return leaf, f"PCK certificate chain has {len(certs)} certificates, expected leaf, intermediate and root"
    if len(certs) == 2 and _roots.fingerprint(certs[-1]) not in trusted:
        # A chain that stops below the root: complete it with the trusted root that issued it.
        top = certs[-1]
        issuers = [c for c in trusted.values() if c.subject == top.issuer and _signed_by(top, c)]
        if top.issuer != top.subject and issuers:
            certs.append(issuers[0])
    if len(certs) != 3:
        return leaf, f"PCK certificate chain has {len(certs)} certificates, expected leaf, intermediate and root"
    root = certs[-1]
    fp = _roots.fingerprint(root)
    if fp not in trusted:
        return leaf, f"PCK chain ends at {_short(root)!r} (sha256 {fp[:16]}...), not a pinned Intel root"
    when = datetime.fromtimestamp(now, UTC)
    for i, cert in enumerate(certs):
        if not cert.not_valid_before_utc <= when <= cert.not_valid_after_utc:
            return leaf, (
                f"{_short(cert)!r} is not valid at {when:%Y-%m-%dT%H:%M:%SZ} "
                f"({cert.not_valid_before_utc:%Y-%m-%d} .. {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        parent = certs[min(i + 1, len(certs) - 1)]
        if cert.issuer != parent.subject:
            return leaf, f"{_short(cert)!r} is not issued by {_short(parent)!r}"
        if not _signed_by(cert, parent):
            return leaf, f"the signature on {_short(cert)!r} does not verify under {_short(parent)!r}"
        if i > 0 and not _is_ca(cert):
            return leaf, f"{_short(cert)!r} is not a CA certificate"
    if _p256_of(leaf) is None:
        return leaf, "the PCK certificate key is not ECDSA P-256"
    return leaf, None


def check_signatures(result: FormatResult, quote: Quote, *, policy: Policy, now: float) -> None:
    """Add `evidence-signature` and `certificate-chain` factors for an Intel ECDSA quote."""
    # The PCK chain first: its leaf key signs the QE report.
    try:
        trusted = {root.sha256: root.cert for root in _roots.trusted_roots("intel", policy)}
    except _roots.RootsError as e:
        chain_error: str | None = str(e)
        leaf, root_fp = None, ""
        try:
            leaf = x509.load_pem_x509_certificates(quote.pck_chain_pem.rstrip(b"\x00"))[0]
        except _CERT_ERRORS:
            pass
    else:
        leaf, chain_error, root_fp = verify_pck_chain(quote.pck_chain_pem, trusted, now)

    problems = []
    key = _p256_key(quote.attestation_key)
    if key is None:
        problems.append("the attestation key is not a P-256 point")
    elif not _verify_raw(key, quote.signature, quote.signed):
        problems.append("the quote signature does not verify under the attestation key")
    leaf_key = _p256_of(leaf)
    if leaf_key is None:
        problems.append("no P-256 PCK certificate to check the QE report signature with")
    elif not _verify_raw(leaf_key, quote.qe_report_signature, quote.qe_report):
        problems.append("the QE report signature does not verify under the PCK certificate")
    binding = hashlib.sha256(quote.attestation_key + quote.qe_auth_data).digest() + bytes(32)
    if not hmac.compare_digest(quote.qe_report[SGX_REPORTDATA : SGX_REPORTDATA + 64], binding):
        problems.append("the QE report does not bind the attestation key (REPORTDATA != SHA-256(key || auth data))")
    if problems:
        result.add("evidence-signature", "fail", "; ".join(problems))
    else:
        result.add("evidence-signature", "pass", "quote signed by the attestation key, which the PCK-signed QE report binds")

    if chain_error or leaf is None:  # a chain without error always has its leaf
        result.add("certificate-chain", "fail", chain_error or "no PCK certificate")
    else:
        intel = _roots.is_pinned("intel", root_fp)
        anchor = "the pinned Intel SGX Root CA" if intel else f"root {root_fp[:16]}... from policy.roots (NOT Intel's)"
        result.add("certificate-chain", "pass", f"PCK chain {_short(leaf)!r} up to {anchor}")


def check_report_data(result: FormatResult, actual: bytes, expected: bytes) -> None:
    ok = len(expected) == 64 and hmac.compare_digest(actual, expected)
    result.add("report-data", "pass" if ok else "fail", "binds these claims" if ok else "REPORTDATA does not match the claims")


def check_debug(result: FormatResult, debug: bool, *, what: str, policy: Policy) -> None:
    if not debug:
        result.add("debug", "pass", f"not a debug {what}")
    elif getattr(policy, "allow_debug", False):
        result.add("debug", "pass", f"DEBUG {what}: its memory is open to the host (allowed by policy)")
    else:
        result.add("debug", "fail", f"debug {what}: the host can read and change its memory")


def tcb_skipped(result: FormatResult) -> None:
    result.add(
        "tcb-status", "skip",
        "TCB status, QE identity and certificate revocation need Intel PCS collateral "
        "(TCB info, QE identity, PCK/root CRLs) fetched online: not checked",
    )
