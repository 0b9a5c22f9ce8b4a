"""SEV-SNP reports: the 1184-byte layout, VCEK signature, VCEK <- ASK <- ARK chain, and the factors."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import random
import sys
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attestation import roots  # noqa: E402
from attestation.claims import Claims, ModelClaim, report_data  # noqa: E402
from attestation.formats import FORMATS  # noqa: E402
from attestation.formats.snp import ARK_GUID, ASK_GUID, VCEK_GUID, VLEK_GUID, CertTableError, parse_cert_table  # noqa: E402
from attestation.policy import Policy  # noqa: E402
from attestation.signing import key_id  # noqa: E402
from attestation.verify import AttestationFailed, verify_attestation  # noqa: E402
from tests.fixtures.tee import amd  # noqa: E402

SNP = FORMATS["sev-snp-report"]
RD = hashlib.sha512(b"claims").digest()


@pytest.fixture
def policy(tmp_path) -> Policy:
    return Policy(roots={"amd": amd.write_root(tmp_path)}, sev_snp={"measurement": amd.MEASUREMENT.hex()})


def check(report: bytes, aux: bytes | None = None, *, policy: Policy, rd: bytes = RD, now: float = amd.NOW):
    res = SNP.check(report, amd.aux_for() if aux is None else aux, report_data=rd, policy=policy, now=now)
    return res, {f.name: f for f in res.factors}


def statuses(res) -> dict[str, str]:
    return {f.name: f.status for f in res.factors}


# --------------------------------------------------------------------------------------------------
# Pinned roots


def test_pinned_amd_arks_match_fingerprints_and_are_self_signed():
    arks = dict(roots.pinned_roots("amd"))
    assert set(arks) == {"ARK-Milan", "ARK-Genoa", "ARK-Turin"}
    for name, cert in arks.items():
        assert roots.fingerprint(cert) == roots.AMD_ARK_SHA256[name]
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == name
        cert.verify_directly_issued_by(cert)  # RSASSA-PSS SHA-384, also proves the PEM was copied intact
        assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS


def test_pinned_aws_root_is_the_der_fingerprint_not_the_zip_hash():
    ((name, cert),) = roots.pinned_roots("aws")
    assert roots.fingerprint(cert) == "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    assert roots.AWS_NITRO_ROOT_G1_ZIP_SHA256 != roots.fingerprint(cert)
    assert cert.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    cert.verify_directly_issued_by(cert)


def test_a_pem_that_does_not_match_its_pin_is_refused(monkeypatch):
    roots.pinned_roots.cache_clear()
    monkeypatch.setitem(roots.AMD_ARK_SHA256, "ARK-Genoa", "00" * 32)
    try:
        with pytest.raises(RuntimeError, match="ARK-Genoa"):
            roots.pinned_roots("amd")
    finally:
        roots.pinned_roots.cache_clear()


def test_cert_table_guids_are_amds_in_rfc4122_byte_order():
    assert VCEK_GUID.bytes.hex() == "63da758de6644564adc5f4b93be8accd"
    assert ASK_GUID.bytes.hex() == "4ab7b379bbac4fe4a02f05aef327c782"
    assert ARK_GUID.bytes.hex() == "c0b406a4a80349529743" "3fb6014cd0ae"
    assert VLEK_GUID == uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")


# --------------------------------------------------------------------------------------------------
# Acceptance


def test_valid_report_passes_every_factor(policy):
    res, f = check(amd.make_report(RD), policy=policy)
    assert statuses(res) == {
        "evidence-format": "pass", "evidence-signature": "pass", "certificate-chain": "pass", "report-data": "pass",
        "debug": "pass", "measurements": "pass", "tcb-status": "skip",
    }
    assert res.provider == "sev-snp" and res.runtime_register is None
    assert res.measurements["measurement"] == amd.MEASUREMENT.hex()
    assert res.measurements["host_data"] == amd.HOST_DATA.hex()
    assert res.measurements["chip_id"] == amd.CHIP_ID.hex()
    assert "AMD KDS" in f["tcb-status"].detail


@pytest.mark.parametrize("version", [2, 3, 5])
def test_report_versions(policy, version):
    res, _ = check(amd.make_report(RD, version=version), policy=policy)
    assert statuses(res)["evidence-format"] == "pass" and not [x for x in res.factors if x.status == "fail"]


def test_host_data_can_be_pinned_too(policy):
    p = dataclasses.replace(policy, sev_snp={"measurement": amd.MEASUREMENT.hex(), "host_data": amd.HOST_DATA.hex()})
    assert check(amd.make_report(RD), policy=p)[1]["measurements"].status == "pass"


def test_pem_and_zero_padded_der_table_entries(policy):
    p = amd.pki()
    pem = p.vcek.public_bytes(serialization.Encoding.PEM)
    aux = amd.cert_table([(amd.VCEK_GUID, pem), (amd.ASK_GUID, amd.der(p.ask) + bytes(37))])
    res, _ = check(amd.make_report(RD), aux, policy=policy)
    assert statuses(res)["certificate-chain"] == "pass" and statuses(res)["evidence-signature"] == "pass"


def test_table_without_an_ark_entry_still_chains_to_the_trusted_root(policy):
    res, _ = check(amd.make_report(RD), amd.aux_for(ark=False), policy=policy)
    assert statuses(res)["certificate-chain"] == "pass"


def test_vlek_signed_report(policy):
    p = amd.pki()
    aux = amd.cert_table([(amd.VLEK_GUID, amd.der(p.vcek)), (amd.ASK_GUID, amd.der(p.ask))])
    res, f = check(amd.make_report(RD, signing_key=1), aux, policy=policy)
    assert statuses(res)["evidence-signature"] == "pass" and "VLEK" in f["evidence-signature"].detail
    # ... but a VLEK-signed report with only a VCEK entry cannot be checked
    res, _ = check(amd.make_report(RD, signing_key=1), policy=policy)
    assert statuses(res)["evidence-signature"] == "fail"


# --------------------------------------------------------------------------------------------------
# A genuine report (Google Cloud, AMD Milan) against the pinned ARK-Milan, no extra root


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # AMD's VCEKs carry serial number 0
@pytest.mark.parametrize("with_ark", [False, True])
def test_real_milan_report_verifies_against_the_pinned_ark(with_ark):
    res = SNP.check(amd.REAL_SNP_REPORT, amd.real_aux(ark=with_ark), report_data=bytes(64), policy=Policy(), now=amd.REAL_NOW)
    f = {x.name: x for x in res.factors}
    assert statuses(res) == {
        "evidence-format": "pass", "evidence-signature": "pass", "certificate-chain": "pass", "report-data": "pass",
        "debug": "pass", "measurements": "skip", "tcb-status": "skip",
    }
    assert "v5" in f["evidence-format"].detail and "ARK-Milan" in f["certificate-chain"].detail
    assert res.measurements["measurement"].startswith("b747d55452e0b9e9")


@pytest.mark.filterwarnings("ignore:Parsed a serial number")
def test_real_milan_report_tampered_or_expired():
    r = bytearray(amd.REAL_SNP_REPORT)
    r[0x90] ^= 1  # MEASUREMENT
    res = SNP.check(bytes(r), amd.real_aux(), report_data=bytes(64), policy=Policy(), now=amd.REAL_NOW)
    assert statuses(res)["evidence-signature"] == "fail"
    before = amd.REAL_NOW - 365 * 86400  # before the VCEK's notBefore
    res = SNP.check(amd.REAL_SNP_REPORT, amd.real_aux(), report_data=bytes(64), policy=Policy(), now=before)
    assert statuses(res)["certificate-chain"] == "fail"


def test_real_milan_ask_chains_to_the_pinned_ark():
    ask = x509.load_pem_x509_certificate(amd.REAL_MILAN_ASK_PEM)
    assert roots.fingerprint(ask) == "67d303bd3905fd38db8b20e0793699870e7fa612eaad5dec358293fd8c0bac1b"
    ask.verify_directly_issued_by(dict(roots.pinned_roots("amd"))["ARK-Milan"])


# --------------------------------------------------------------------------------------------------
# Rejections


def test_wrong_report_data(policy):
    res, f = check(amd.make_report(RD), policy=policy, rd=hashlib.sha512(b"other claims").digest())
    assert f["report-data"].status == "fail"
    assert statuses(res)["evidence-signature"] == "pass"  # the hardware did sign it: for other claims


def test_debug_policy_fails_unless_allowed(policy):
    report = amd.make_report(RD, policy=amd.POLICY | amd.POLICY_DEBUG)
    assert check(report, policy=policy)[1]["debug"].status == "fail"
    f = check(report, policy=dataclasses.replace(policy, allow_debug=True))[1]["debug"]
    assert f.status == "pass" and "allowed by policy" in f.detail


def test_untrusted_root_without_extra_root():
    res, f = check(amd.make_report(RD), policy=Policy())
    assert f["certificate-chain"].status == "fail" and "pinned AMD ARK" in f["certificate-chain"].detail
    assert f["evidence-signature"].status == "pass"  # signed, but by nobody AMD vouches for


def test_forged_ark_under_amds_real_name_is_not_trusted():
    real_milan = dict(roots.pinned_roots("amd"))["ARK-Milan"]
    forged = amd.make_pki(tag="forged-milan", ark_name=real_milan.subject)
    aux = amd.aux_for(forged)
    res, f = check(amd.make_report(RD, key=forged.vcek_key), aux, policy=Policy())
    assert forged.ask.issuer == real_milan.subject
    assert f["certificate-chain"].status == "fail"


def test_missing_extra_root_file_fails_the_chain(tmp_path):
    res, f = check(amd.make_report(RD), policy=Policy(roots={"amd": str(tmp_path / "nope.pem")}))
    assert f["certificate-chain"].status == "fail" and "unusable" in f["certificate-chain"].detail


@pytest.mark.parametrize("offset", [0x1E8, 0x90, 0x2A0, 0x2E8 + 5])
def test_bad_signature_byte_flip(policy, offset):
    r = bytearray(amd.make_report(RD))
    r[offset] ^= 0x01
    assert check(bytes(r), policy=policy)[1]["evidence-signature"].status == "fail"


def test_report_signed_by_another_key(policy):
    other = amd.make_pki(tag="other")
    assert check(amd.make_report(RD, key=other.vcek_key), policy=policy)[1]["evidence-signature"].status == "fail"


def test_chain_broken_ask_not_issued_by_the_ark(policy, tmp_path):
    p, other = amd.pki(), amd.make_pki(tag="other")
    # the VCEK and report are genuine, but the ASK supplied is another PKI's (same names)
    aux = amd.cert_table([(amd.VCEK_GUID, amd.der(p.vcek)), (amd.ASK_GUID, amd.der(other.ask))])
    assert check(amd.make_report(RD), aux, policy=policy)[1]["certificate-chain"].status == "fail"
    # another PKI's VCEK (it signed the report) under the genuine ASK
    aux = amd.cert_table([(amd.VCEK_GUID, amd.der(other.vcek)), (amd.ASK_GUID, amd.der(p.ask))])
    res, f = check(amd.make_report(RD, key=other.vcek_key), aux, policy=policy)
    assert f["evidence-signature"].status == "pass" and f["certificate-chain"].status == "fail"


def test_vcek_for_another_chip(policy):
    report = amd.make_report(RD, chip_id=hashlib.sha512(b"another chip").digest())
    f = check(report, policy=policy)[1]["certificate-chain"]
    assert f.status == "fail" and "another chip" in f.detail


def test_turin_style_8_byte_hwid(policy, tmp_path):
    turin = amd.make_pki(tag="turin", chip_id=amd.CHIP_ID[:8])
    p = dataclasses.replace(policy, roots={"amd": amd.write_root(tmp_path, turin, "turin.pem")})
    res, f = check(amd.make_report(RD, key=turin.vcek_key), amd.aux_for(turin), policy=p)
    assert f["certificate-chain"].status == "pass"
    other = amd.make_report(RD, key=turin.vcek_key, chip_id=hashlib.sha512(b"another chip").digest())
    assert check(other, amd.aux_for(turin), policy=p)[1]["certificate-chain"].status == "fail"


def test_no_certificates_is_a_skip_for_the_chain_but_never_a_pass(policy):
    res = SNP.check(amd.make_report(RD), None, report_data=RD, policy=policy, now=amd.NOW)
    f = {x.name: x for x in res.factors}
    assert f["certificate-chain"].status == "skip"
    assert f["certificate-chain"].detail == "VCEK not supplied; fetch from AMD KDS online"
    assert f["evidence-signature"].status == "fail"  # so the whole attestation fails


def test_vcek_without_ask_fails(policy):
    res, f = check(amd.make_report(RD), amd.aux_for(ask=False, ark=False), policy=policy)
    assert f["certificate-chain"].status == "fail"


@pytest.mark.parametrize(
    "aux",
    [
        b"\x01" * 23,  # shorter than one entry
        amd.VCEK_GUID.bytes + b"\x30\x00\x00\x00\x10\x00\x00\x00",  # not terminated
        amd.cert_table([(amd.VCEK_GUID, b"x" * 10)])[:-5],  # entry runs past the end
        amd.cert_table([(amd.VCEK_GUID, b"x"), (amd.VCEK_GUID, b"y")]),  # twice
        amd.cert_table([(amd.VCEK_GUID, b"not a certificate")]),
        amd.cert_table([(amd.VCEK_GUID, b"\x30\x82\x05\x00" + b"\x00" * 40)]),
    ],
)
def test_malformed_certificate_tables_fail_without_raising(policy, aux):
    res, f = check(amd.make_report(RD), aux, policy=policy)
    assert f["evidence-signature"].status == "fail"
    assert f["certificate-chain"].status in ("fail", "skip")


def test_parse_cert_table_rejects_overlapping_header():
    bad = amd.VCEK_GUID.bytes + (4).to_bytes(4, "little") + (4).to_bytes(4, "little") + bytes(24)
    with pytest.raises(CertTableError):
        parse_cert_table(bad)


@pytest.mark.parametrize("size", [0, 1, 0x2A0, 0x4A0 - 1, 0x4A0 + 1, 0x1000])
def test_truncated_or_oversized(policy, size):
    report = (amd.make_report(RD) + bytes(0x1000))[:size]
    res, f = check(report, policy=policy)
    assert [x.name for x in res.factors] == ["evidence-format"] and f["evidence-format"].status == "fail"


@pytest.mark.parametrize("kw", [{"version": 1}, {"version": 99}, {"sig_algo": 2}])
def test_unsupported_version_or_algorithm(policy, kw):
    assert check(amd.make_report(RD, **kw), policy=policy)[1]["evidence-format"].status == "fail"


def test_report_signed_by_no_key(policy):
    res, f = check(amd.make_report(RD, signing_key=7), policy=policy)
    assert f["evidence-signature"].status == "fail" and f["certificate-chain"].status == "fail"


def test_measurement_mismatch(policy):
    report = amd.make_report(RD, measurement=hashlib.sha384(b"another image").digest())
    f = check(report, policy=policy)[1]["measurements"]
    assert f.status == "fail" and "measurement" in f.detail
    # a policy key the report does not have never passes
    p = dataclasses.replace(policy, sev_snp={"measurment": amd.MEASUREMENT.hex()})
    assert check(amd.make_report(RD), policy=p)[1]["measurements"].status == "fail"


def test_random_corruption_never_raises(policy):
    """Any flip in the signed bytes or the signature fails; table corruption never raises."""
    rng = random.Random(1234)
    good = amd.make_report(RD)
    aux = amd.aux_for()
    for _ in range(200):
        r = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            r[rng.randrange(0x330)] ^= 1 << rng.randrange(8)  # 0x330..0x4A0 is reserved and unsigned
        res = SNP.check(bytes(r), aux, report_data=RD, policy=policy, now=amd.NOW)
        assert any(x.status == "fail" for x in res.factors) or bytes(r) == good
        a = bytearray(aux)
        for _ in range(rng.randint(1, 4)):
            a[rng.randrange(len(a))] ^= 1 << rng.randrange(8)
        SNP.check(good, bytes(a), report_data=RD, policy=policy, now=amd.NOW)  # must not raise
    for n in range(0, len(aux), 7):
        SNP.check(good, aux[:n], report_data=RD, policy=policy, now=amd.NOW)


# --------------------------------------------------------------------------------------------------
# Through verify_attestation


def _document(report_bytes_for, *, nonce: str, provider: str = "sev-snp", aux: bytes | None = None) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    raw_pub = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    claims = Claims(
        appliance_version="0.1.0", variant="cpu", binary_kind="package", binary_sha256="ab" * 32,
        config_sha256="cd" * 32, signing_public_key=base64.b64encode(raw_pub).decode(), signing_kid=key_id(raw_pub),
        nonce=nonce, timestamp=int(amd.NOW), provider=provider, models=(ModelClaim("m", "ef" * 32),),
    )
    raw = claims.encode()
    return {
        "version": 1, "provider": provider, "format": "sev-snp-report",
        "claims_b64": base64.b64encode(raw).decode(),
        "evidence_b64": base64.b64encode(report_bytes_for(report_data(raw))).decode(),
        "aux_b64": base64.b64encode(amd.aux_for() if aux is None else aux).decode(),
    }


def test_verify_attestation_end_to_end(policy):
    nonce = "11" * 32
    report = verify_attestation(_document(amd.make_report, nonce=nonce), nonce=nonce, policy=policy, now=amd.NOW)
    st = {f.name: f.status for f in report.factors}
    assert st["evidence-signature"] == st["certificate-chain"] == st["report-data"] == st["provider"] == "pass"
    assert st["event-log"] == "skip" and report.measurements["measurement"] == amd.MEASUREMENT.hex()


def test_verify_attestation_refuses_a_report_for_other_claims(policy):
    nonce = "11" * 32
    doc = _document(lambda rd: amd.make_report(hashlib.sha512(b"x").digest()), nonce=nonce)
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(doc, nonce=nonce, policy=policy, now=amd.NOW)
    assert [f.name for f in e.value.report.failures()] == ["report-data"]


def test_verify_attestation_refuses_a_report_without_certificates(policy):
    nonce = "11" * 32
    doc = _document(amd.make_report, nonce=nonce)
    doc["aux_b64"] = None
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(doc, nonce=nonce, policy=policy, now=amd.NOW)
    assert "evidence-signature" in [f.name for f in e.value.report.failures()]
