"""`sev-snp-report`: an AMD SEV-SNP ATTESTATION_REPORT (1184 bytes) and its certificate table.

The report (SEV-SNP ABI spec, "ATTESTATION_REPORT Structure"; all integers little-endian):

    0x000 VERSION u32          0x004 GUEST_SVN u32        0x008 POLICY u64 (bit 19: DEBUG allowed)
    0x010 FAMILY_ID 16         0x020 IMAGE_ID 16          0x030 VMPL u32
    0x034 SIGNATURE_ALGO u32 (1 = ECDSA P-384 with SHA-384)
    0x038 CURRENT_TCB u64      0x040 PLATFORM_INFO u64    0x048 flags u32 (bits 4:2 SIGNING_KEY:
                                                                  0 VCEK, 1 VLEK, 7 none)
    0x050 REPORT_DATA 64       0x090 MEASUREMENT 48       0x0C0 HOST_DATA 32
    0x0E0 ID_KEY_DIGEST 48     0x110 AUTHOR_KEY_DIGEST 48 0x140 REPORT_ID 32   0x160 REPORT_ID_MA 32
    0x180 REPORTED_TCB u64     0x1A0 CHIP_ID 64           ...
    0x2A0 SIGNATURE: R (72 bytes, little-endian), S (72 bytes, little-endian), reserved to 0x4A0

signed over bytes 0x000..0x29F by the VCEK (or VLEK), whose certificate chains VCEK <- ASK <- ARK
(RSASSA-PSS SHA-384 on AMD's certificates). The chain comes in `aux`: the extended-report
certificate table (configfs-tsm `auxblob`; GHCB spec, "SNP Extended Guest Request"): entries of a
16-byte GUID (RFC 4122 byte order) + u32 offset + u32 length, offsets from the table's start,
ended by an all-zero entry. GUIDs, as in google/go-sev-guest abi and virtee/sev:

    VCEK 63da758d-e664-4564-adc5-f4b93be8accd    VLEK a8074bc2-a25a-483e-aae6-39c045a0b8a1
    ASK  4ab7b379-bbac-4fe4-a02f-05aef327c782    ARK  c0b406a4-a803-4952-9743-3fb6014cd0ae

The ARK entry of the table is never trusted: the ASK must be issued by a pinned AMD ARK
(`attestation.roots`, Milan/Genoa/Turin) or by an extra root from `policy.roots["amd"]`.

Without certificates the chain factor is skipped (the VCEK can be fetched from AMD's KDS online,
which this offline verifier does not do) and the signature factor FAILS: an unverifiable report
must never count as evidence. TCB status needs AMD KDS collateral and is skipped. SEV-SNP has no
runtime measurement register usable here (no RTMR; a vTPM at VMPL>0 is out of scope), so
`runtime_register` stays None and the event log is not replayed against hardware.
"""

from __future__ import annotations

import hmac
import struct
import uuid
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ..policy import Policy
from ..roots import RootsError, fingerprint, trusted_roots
from . import FormatResult, expect_measurements, register
from ._x509 import link_problem

__all__ = ["SnpFormat", "REPORT_SIZE", "CERT_GUIDS", "parse_cert_table"]

REPORT_SIZE = 0x4A0  # 1184
SIGNED_LEN = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 4, 5)
POLICY_DEBUG = 1 << 19

VCEK_GUID = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
VLEK_GUID = uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")
ASK_GUID = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")
ARK_GUID = uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae")
CERT_GUIDS = {VCEK_GUID: "VCEK", VLEK_GUID: "VLEK", ASK_GUID: "ASK", ARK_GUID: "ARK"}

_MAX_TABLE_ENTRIES = 64
_OID_HWID = x509.ObjectIdentifier("1.3.6.1.4.1.3704.1.4")  # VCEK extension: the chip's HWID (CHIP_ID)


class CertTableError(ValueError):
    pass


def parse_cert_table(aux: bytes) -> dict[uuid.UUID, bytes]:
    """GUID -> entry bytes from an SNP extended-report certificate table; strict bounds checks."""
    entries: dict[uuid.UUID, bytes] = {}
    for i in range(_MAX_TABLE_ENTRIES + 1):
        pos = i * 24
        if pos + 24 > len(aux):
            raise CertTableError("certificate table is not terminated by an all-zero entry")
        raw_guid, offset, length = aux[pos : pos + 16], *struct.unpack_from("<II", aux, pos + 16)
        if raw_guid == bytes(16) and offset == 0 and length == 0:
            return entries
        guid = uuid.UUID(bytes=raw_guid)
        if guid in entries:
            raise CertTableError(f"certificate table lists {guid} twice")
        if length == 0 or offset < 24 * (i + 1) or offset + length > len(aux):
            raise CertTableError(f"certificate table entry {guid} points outside the table")
        entries[guid] = aux[offset : offset + length]
    raise CertTableError(f"certificate table has more than {_MAX_TABLE_ENTRIES} entries")


def _load_cert(blob: bytes) -> x509.Certificate:
    """A certificate from a table entry: DER (possibly zero-padded) or PEM. ValueError if malformed."""
    try:
        if blob.lstrip().startswith(b"-----BEGIN"):
            return _parsed(x509.load_pem_x509_certificate(blob))
        # DER SEQUENCE header: the entry may be padded past the certificate's own length.
        if len(blob) >= 4 and blob[0] == 0x30 and blob[1] & 0x80:
            n = blob[1] & 0x7F
            if 1 <= n <= 3 and len(blob) >= 2 + n:
                blob = blob[: 2 + n + int.from_bytes(blob[2 : 2 + n], "big")]
        return _parsed(x509.load_der_x509_certificate(blob))
    except ValueError:
        raise
    except Exception as e:  # InvalidVersion, UnsupportedAlgorithm, ...: untrusted bytes never raise out
        raise ValueError(f"malformed certificate ({e.__class__.__name__})") from None


def _parsed(cert: x509.Certificate) -> x509.Certificate:
    """Touch the lazily parsed parts now, so malformed certificates fail here, not mid-check."""
    cert.public_key(), cert.extensions, cert.subject, cert.issuer
    cert.not_valid_before_utc, cert.not_valid_after_utc  # noqa: B018
    return cert


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


class SnpFormat:
    format = "sev-snp-report"

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult:
        result = FormatResult(provider="sev-snp")
        r = evidence
        if not isinstance(r, (bytes, bytearray)) or len(r) != REPORT_SIZE:
            result.add("evidence-format", "fail", f"an SEV-SNP report is exactly {REPORT_SIZE} bytes, got {len(r)}")
            return result
        r = bytes(r)
        version, guest_svn, snp_policy = struct.unpack_from("<IIQ", r, 0)
        vmpl, sig_algo = struct.unpack_from("<II", r, 0x30)
        (flags,) = struct.unpack_from("<I", r, 0x48)
        if version not in SUPPORTED_VERSIONS:
            result.add("evidence-format", "fail", f"unsupported SEV-SNP report version {version}")
            return result
        if sig_algo != 1:
            result.add("evidence-format", "fail", f"signature algorithm {sig_algo} is not ECDSA P-384/SHA-384")
            return result
        signing_key = (flags >> 2) & 0x7
        result.add("evidence-format", "pass", f"SEV-SNP report v{version}, VMPL {vmpl}, guest SVN {guest_svn}")

        result.measurements = {
            "measurement": r[0x90:0xC0].hex(),
            "host_data": r[0xC0:0xE0].hex(),
            "id_key_digest": r[0xE0:0x110].hex(),
            "author_key_digest": r[0x110:0x140].hex(),
            "family_id": r[0x10:0x20].hex(),
            "image_id": r[0x20:0x30].hex(),
            "report_id": r[0x140:0x160].hex(),
            "reported_tcb": r[0x180:0x188].hex(),
            "chip_id": r[0x1A0:0x1E0].hex(),
            "policy": f"{snp_policy:016x}",
        }

        try:
            self._signature_and_chain(result, r, aux, signing_key, policy, now)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:  # a certificate malformed in a way parsing did not catch
            done = {f.name for f in result.factors}
            for name in ("evidence-signature", "certificate-chain"):
                if name not in done:
                    result.add(name, "fail", f"malformed certificate ({e.__class__.__name__})")

        ok = isinstance(report_data, bytes) and len(report_data) == 64 and hmac.compare_digest(r[0x50:0x90], report_data)
        result.add(
            "report-data", "pass" if ok else "fail",
            "REPORT_DATA binds these claims" if ok else "REPORT_DATA does not match the claims",
        )

        if snp_policy & POLICY_DEBUG:
            allowed = bool(getattr(policy, "allow_debug", False))
            why = " (allowed by policy)" if allowed else ": the hypervisor can read and alter guest memory"
            result.add("debug", "pass" if allowed else "fail", "guest policy allows DEBUG" + why)
        else:
            result.add("debug", "pass", "guest policy forbids DEBUG")

        expect_measurements(result, getattr(policy, "sev_snp", None) or {}, "SEV-SNP")
        result.add("tcb-status", "skip", "needs AMD KDS collateral (VCEK TCB, CRL) fetched online")
        result.runtime_register = None  # SEV-SNP: no runtime measurement register usable here
        return result

    def _signature_and_chain(
        self, result: FormatResult, r: bytes, aux: bytes | None, signing_key: int, policy: Policy, now: float
    ) -> None:
        if signing_key not in (0, 1):
            result.add("evidence-signature", "fail", f"report is not signed by a VCEK or VLEK (SIGNING_KEY={signing_key})")
            result.add("certificate-chain", "fail", "no endorsement key to chain")
            return
        leaf_name, leaf_guid = ("VCEK", VCEK_GUID) if signing_key == 0 else ("VLEK", VLEK_GUID)
        if not aux:
            result.add("evidence-signature", "fail", f"cannot verify the report signature: {leaf_name} not supplied")
            result.add("certificate-chain", "skip", f"{leaf_name} not supplied; fetch from AMD KDS online")
            return
        try:
            table = parse_cert_table(aux)
        except CertTableError as e:
            result.add("evidence-signature", "fail", f"cannot verify the report signature: {e}")
            result.add("certificate-chain", "fail", str(e))
            return
        if leaf_guid not in table:
            result.add("evidence-signature", "fail", f"cannot verify the report signature: {leaf_name} not supplied")
            result.add("certificate-chain", "skip", f"{leaf_name} not supplied; fetch from AMD KDS online")
            return
        try:
            leaf = _load_cert(table[leaf_guid])
            ask = _load_cert(table[ASK_GUID]) if ASK_GUID in table else None
        except ValueError:
            result.add("evidence-signature", "fail", "a certificate in the certificate table does not parse")
            result.add("certificate-chain", "fail", "a certificate in the certificate table does not parse")
            return

        # 1. The report signature, by the endorsement key in the leaf certificate.
        key = leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            result.add("evidence-signature", "fail", f"{leaf_name} key is not ECDSA P-384")
        else:
            sig_r = int.from_bytes(r[0x2A0:0x2E8], "little")
            sig_s = int.from_bytes(r[0x2E8:0x330], "little")
            try:
                key.verify(encode_dss_signature(sig_r, sig_s), r[:SIGNED_LEN], ec.ECDSA(hashes.SHA384()))
            except InvalidSignature:
                result.add("evidence-signature", "fail", f"report signature does not verify with the {leaf_name}")
            else:
                result.add("evidence-signature", "pass", f"report signed by the {leaf_name}")

        # 2. The chain: leaf <- ASK <- a trusted ARK (pinned, or from the policy).
        if ask is None:
            # Not a skip: a self-made "VCEK" verifies its own signature; only the chain makes it AMD's.
            result.add("certificate-chain", "fail", f"ASK not supplied: the {leaf_name} cannot be chained to an AMD ARK")
            return
        when = _at(now)
        why = link_problem(leaf, ask, when)
        if why:
            result.add("certificate-chain", "fail", why)
            return
        try:
            roots = trusted_roots("amd", policy)
        except RootsError as e:
            result.add("certificate-chain", "fail", f"extra AMD root from the policy is unusable: {e}")
            return
        reasons = []
        for name, root in roots:
            if root.subject != ask.issuer:
                continue
            why = link_problem(ask, root, when)
            if why is None:
                why = link_problem(root, root, when)
            if why is None:
                hw = self._hwid_mismatch(leaf, r)
                if hw:
                    result.add("certificate-chain", "fail", hw)
                else:
                    chain = f"{leaf_name} <- {ask.subject.rfc4514_string()} <- {name} (sha256 {fingerprint(root)[:16]}…)"
                    result.add("certificate-chain", "pass", chain)
                return
            reasons.append(why)
        detail = "ASK is not issued by a pinned AMD ARK or a policy root"
        detail += f" ({reasons[0]})" if reasons else f" (issuer {ask.issuer.rfc4514_string()})"
        result.add("certificate-chain", "fail", detail)

    @staticmethod
    def _hwid_mismatch(leaf: x509.Certificate, r: bytes) -> str | None:
        """A VCEK names its chip (HWID extension): it must be the chip in the report, unless masked.
        Milan/Genoa HWIDs are the full 64-byte CHIP_ID; Turin's are 8 bytes (CHIP_ID's prefix)."""
        chip_id = r[0x1A0:0x1E0]
        try:
            ext = leaf.extensions.get_extension_for_oid(_OID_HWID).value
        except x509.ExtensionNotFound:
            return None
        if not isinstance(ext, x509.UnrecognizedExtension):  # an unknown OID's extension: its raw bytes
            return None
        value = ext.value
        if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2:  # DER OCTET STRING
            value = value[2:]
        if chip_id == bytes(64) or len(value) not in (8, 64) or hmac.compare_digest(value, chip_id[: len(value)]):
            return None
        return "the VCEK was issued for another chip (HWID differs from CHIP_ID)"


register(SnpFormat())
