"""Intel TDX (quote v4) and SGX (quote v3) evidence: parsing, signatures, the PCK chain to a pinned
root, report data, debug, measurements -- and each way a quote is refused.

Quotes are built byte for byte by tests/fixtures/tee/intel.py and signed by a test PKI whose root is
trusted only through `policy.roots["intel"]`; one genuine TDX quote (chain to the real Intel SGX
Root CA) checks the parser and the pinned root against real bytes.
"""

from __future__ import annotations

import base64
import hashlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from attestation import roots  # noqa: E402
from attestation.claims import Claims, ModelClaim, report_data  # noqa: E402
from attestation.formats import (  # noqa: E402
    FORMATS,
    _intel,
)
from attestation.measurements import event_digest, model_event, replay  # noqa: E402
from attestation.policy import Policy  # noqa: E402
from attestation.signing import key_id  # noqa: E402
from attestation.verify import AttestationFailed, verify_attestation  # noqa: E402
from tests.fixtures.tee import intel  # noqa: E402

RD = hashlib.sha512(b"expected report data").digest()
TDX = FORMATS["tdx-quote-v4"]
SGX = FORMATS["sgx-quote-v3"]


@pytest.fixture(scope="module")
def root_path(tmp_path_factory) -> Path:
    return intel.default_pki().write_root(tmp_path_factory.mktemp("roots") / "test-root.pem")


@pytest.fixture
def policy(root_path) -> Policy:
    return Policy(roots={"intel": str(root_path)})


def factors(result) -> dict[str, str]:
    return {f.name: f.status for f in result.factors}


def detail(result, name: str) -> str:
    return next(f.detail for f in result.factors if f.name == name)


def check_tdx(quote: bytes, policy: Policy, *, rd: bytes = RD, now: float = intel.NOW):
    return TDX.check(quote, None, report_data=rd, policy=policy, now=now)


def check_sgx(quote: bytes, policy: Policy, *, rd: bytes = RD, now: float = intel.NOW):
    return SGX.check(quote, None, report_data=rd, policy=policy, now=now)


ALL_PASS = {
    "evidence-format": "pass",
    "evidence-signature": "pass",
    "certificate-chain": "pass",
    "report-data": "pass",
    "debug": "pass",
    "measurements": "skip",
    "tcb-status": "skip",
}


# --------------------------------------------------------------------------------------------------
# Pinned roots


def test_pinned_intel_root_matches_its_fingerprint():
    [(name, cert)] = roots.pinned_roots("intel")
    assert name == "Intel SGX Root CA"
    assert roots.fingerprint(cert) == roots.INTEL_SGX_ROOT_CA_SHA256
    assert cert.subject.rfc4514_string().endswith("CN=Intel SGX Root CA")
    assert roots.is_pinned("intel", roots.INTEL_SGX_ROOT_CA_SHA256)
    assert not roots.is_pinned("amd", roots.INTEL_SGX_ROOT_CA_SHA256)
    assert set(roots.ROOT_PEMS) == set(roots.ROOT_SHA256) == {"intel", "amd", "aws"}
    for vendor, pems in roots.ROOT_PEMS.items():  # every PEM hashes to its pinned fingerprint
        assert [r.name for r in roots.pinned_roots(vendor)] == list(pems) == list(roots.ROOT_SHA256[vendor])
        assert [r.sha256 for r in roots.pinned_roots(vendor)] == list(roots.ROOT_SHA256[vendor].values())


def test_extra_roots_from_policy(root_path, tmp_path):
    assert roots.extra_roots("intel", Policy()) == []
    extra = roots.extra_roots("intel", Policy(roots={"intel": [str(root_path), str(root_path)]}))
    assert [name for name, _ in extra] == [f"policy root {root_path}"] * 2
    trusted = roots.trusted_roots("intel", Policy(roots={"intel": str(root_path)}))
    assert trusted == [*roots.pinned_roots("intel"), *extra[:1]]
    assert roots.trusted_roots("amd", Policy(roots={"intel": str(root_path)})) == list(roots.pinned_roots("amd"))
    with pytest.raises(roots.RootsError, match="cannot read"):
        roots.extra_roots("intel", Policy(roots={"intel": str(tmp_path / "missing.pem")}))
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(roots.RootsError, match="holds no PEM certificate"):
        roots.extra_roots("intel", Policy(roots={"intel": str(tmp_path / "junk.pem")}))
    with pytest.raises(roots.RootsError, match="must be a PEM path"):
        roots.extra_roots("amd", Policy(roots={"amd": {"not": "a path"}}))


# --------------------------------------------------------------------------------------------------
# A genuine TDX quote


def test_real_tdx_quote_chains_to_the_pinned_intel_root():
    q = intel.REAL_TDX_QUOTE
    result = check_tdx(q, Policy(), rd=bytes(64), now=intel.REAL_TDX_NOW)
    got = factors(result)
    assert got["evidence-format"] == "pass" and "70 bytes of zero padding" in detail(result, "evidence-format")
    assert got["evidence-signature"] == "pass"
    assert got["certificate-chain"] == "pass"
    assert "the pinned Intel SGX Root CA" in detail(result, "certificate-chain")
    assert got["report-data"] == "fail"  # it answers someone else's report data
    assert got["debug"] == "pass"
    assert result.measurements["mrtd"] == q[0x30 + 0x88 : 0x30 + 0xB8].hex()
    assert result.measurements["mrtd"].startswith("7ba9e262ce697908")
    assert result.runtime_register == q[0x30 + 0x1D8 : 0x30 + 0x208]
    assert result.measurements["qe_mrsigner"] == intel.QE_MRSIGNER.hex()
    # its own report data passes
    assert factors(check_tdx(q, Policy(), rd=q[0x238:0x278], now=intel.REAL_TDX_NOW))["report-data"] == "pass"


def test_real_tdx_quote_after_its_pck_certificate_expired():
    later = datetime(2032, 1, 1, tzinfo=UTC).timestamp()
    result = check_tdx(intel.REAL_TDX_QUOTE, Policy(), rd=bytes(64), now=later)
    assert factors(result)["certificate-chain"] == "fail"
    assert "not valid at" in detail(result, "certificate-chain")


def test_real_tdx_quote_with_a_changed_mrtd_fails_its_signature():
    q = intel.flip(intel.REAL_TDX_QUOTE, 0x30 + 0x88)
    assert factors(check_tdx(q, Policy(), rd=bytes(64), now=intel.REAL_TDX_NOW))["evidence-signature"] == "fail"


# --------------------------------------------------------------------------------------------------
# Valid test quotes


def test_valid_tdx_quote_passes(policy):
    result = check_tdx(intel.tdx_quote(RD), policy)
    assert factors(result) == ALL_PASS, result.factors
    assert "NOT Intel's" in detail(result, "certificate-chain")  # the test root is named as such
    assert result.provider == "tdx"
    assert result.measurements["mrtd"] == intel.MRTD.hex()
    for i in range(4):
        assert result.measurements[f"rtmr{i}"] == intel.RTMRS[i].hex()
    assert result.runtime_register == intel.RTMRS[3]


def test_valid_sgx_quote_passes(policy):
    result = check_sgx(intel.sgx_quote(RD), policy)
    assert factors(result) == ALL_PASS, result.factors
    assert result.provider == "gramine-sgx"
    assert result.measurements["mrenclave"] == intel.MRENCLAVE.hex()
    assert result.measurements["mrsigner"] == intel.MRSIGNER.hex()
    assert result.measurements["isvprodid"] == "1" and result.measurements["isvsvn"] == "2"
    assert result.runtime_register is None


def test_zero_padding_after_the_quote_is_tolerated(policy):
    result = check_tdx(intel.tdx_quote(RD, padding=100), policy)
    assert factors(result) == ALL_PASS
    assert "100 bytes of zero padding" in detail(result, "evidence-format")


def test_chain_without_the_root_is_completed_from_the_trusted_roots(policy):
    pki = intel.default_pki()
    q = intel.tdx_quote(RD, chain_pem=pki.chain_pem(pki.pck, pki.inter))
    result = check_tdx(q, policy)
    assert factors(result)["certificate-chain"] == "pass"
    assert roots.fingerprint(pki.root)[:16] in detail(result, "certificate-chain")
    # ...but a leaf alone is not a chain
    q = intel.tdx_quote(RD, chain_pem=pki.chain_pem(pki.pck))
    assert factors(check_tdx(q, policy))["certificate-chain"] == "fail"


def test_measurements_match_the_policy(root_path):
    p = Policy.from_dict({
        "roots": {"intel": str(root_path)},
        "tdx": {"mrtd": intel.MRTD.hex().upper(), "rtmr0": intel.RTMRS[0].hex(), "rtmr1": intel.RTMRS[1].hex(), "rtmr2": intel.RTMRS[2].hex()},
        "sgx": {"mrenclave": intel.MRENCLAVE.hex(), "mrsigner": intel.MRSIGNER.hex()},
    })
    assert factors(check_tdx(intel.tdx_quote(RD), p))["measurements"] == "pass"
    assert factors(check_sgx(intel.sgx_quote(RD), p))["measurements"] == "pass"


def test_debug_allowed_by_policy(root_path):
    p = Policy(roots={"intel": str(root_path)}, allow_debug=True)
    result = check_tdx(intel.tdx_quote(RD, debug=True), p)
    assert factors(result)["debug"] == "pass" and "DEBUG" in detail(result, "debug")


# --------------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_wrong_report_data(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(hashlib.sha512(b"other claims").digest()), policy)
    got = factors(result)
    assert got["report-data"] == "fail"
    assert got["evidence-signature"] == "pass" and got["certificate-chain"] == "pass"


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_debug_refused(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(RD, debug=True), policy)
    assert factors(result)["debug"] == "fail"
    assert factors(result)["evidence-signature"] == "pass"


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_untrusted_root(kind):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(RD), Policy())  # the test root is not configured
    got = factors(result)
    assert got["certificate-chain"] == "fail"
    assert "not a pinned Intel root" in detail(result, "certificate-chain")
    assert got["evidence-signature"] == "pass"  # the quote itself is consistent; its chain is not


def test_another_root_with_the_same_name_is_not_trusted(policy):
    impostor = intel.make_pki()  # same subject names, different keys
    result = check_tdx(intel.tdx_quote(RD, pki=impostor), policy)
    assert factors(result)["certificate-chain"] == "fail"


def test_unreadable_extra_root_fails_the_chain(tmp_path):
    result = check_tdx(intel.tdx_quote(RD), Policy(roots={"intel": str(tmp_path / "nope.pem")}))
    assert factors(result)["certificate-chain"] == "fail"
    assert "cannot read" in detail(result, "certificate-chain")


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_bad_quote_signature(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    q = build(RD)
    for where in ("signature", "body", "report_data"):
        result = check(intel.flip(q, intel.offsets(q)[where] + 5), policy)
        assert factors(result)["evidence-signature"] == "fail", where
        assert "quote signature does not verify" in detail(result, "evidence-signature")
    # the header is signed too
    assert factors(check(intel.flip(q, 20), policy))["evidence-signature"] == "fail"


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_bad_qe_report_signature(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    q = build(RD)
    result = check(intel.flip(q, intel.offsets(q)["qe_report_signature"] + 7), policy)
    assert factors(result)["evidence-signature"] == "fail"
    assert "QE report signature" in detail(result, "evidence-signature")
    # a QE report signed by a key other than the PCK certificate's
    import cryptography.hazmat.primitives.asymmetric.ec as ec

    result = check(build(RD, qe_signer=ec.generate_private_key(ec.SECP256R1())), policy)
    assert "QE report signature" in detail(result, "evidence-signature")


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_qe_binding_broken(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(RD, bind_key=False), policy)
    assert factors(result)["evidence-signature"] == "fail"
    assert "does not bind the attestation key" in detail(result, "evidence-signature")
    # changing the auth data after the fact breaks the binding as well
    q = build(RD)
    result = check(intel.flip(q, intel.offsets(q)["qe_auth_data"]), policy)
    assert "does not bind" in detail(result, "evidence-signature")


def test_swapped_attestation_key_fails(policy):
    q = intel.tdx_quote(RD)
    other = intel.tdx_quote(RD)
    o = intel.offsets(q)["attestation_key"]
    forged = q[:o] + other[o : o + 64] + q[o + 64 :]
    assert factors(check_tdx(forged, policy))["evidence-signature"] == "fail"


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_truncated_quote(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    q = build(RD)
    for n in (0, 10, 47, 48, 300, intel.offsets(q)["signature"], intel.offsets(q)["qe_report"] + 100, len(q) - 1):
        result = check(q[:n], policy)
        assert factors(result) == {"evidence-format": "fail"}, n
        assert "truncated" in detail(result, "evidence-format") or n == 0


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_oversized_quote(kind, policy):
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(RD, padding=64 * 1024), policy)
    assert factors(result) == {"evidence-format": "fail"}
    assert "more than" in detail(result, "evidence-format")


def test_trailing_garbage_is_refused(policy):
    q = intel.tdx_quote(RD) + b"\x00\x00junk"
    assert factors(check_tdx(q, policy)) == {"evidence-format": "fail"}


def test_wrong_kind_of_quote_is_refused(policy):
    assert factors(check_tdx(intel.sgx_quote(RD), policy)) == {"evidence-format": "fail"}
    assert factors(check_sgx(intel.tdx_quote(RD), policy)) == {"evidence-format": "fail"}
    wrong_key = intel.sign_quote(intel.header(4, intel.TEE_TDX, key_type=3), intel.td_report(RD))
    assert "attestation key type 3" in detail(check_tdx(wrong_key, policy), "evidence-format")
    wrong_tee = intel.sign_quote(intel.header(4, intel.TEE_SGX), intel.td_report(RD))
    assert "TEE type" in detail(check_tdx(wrong_tee, policy), "evidence-format")


def test_inconsistent_sizes_are_refused(policy):
    q = bytearray(intel.tdx_quote(RD))
    o = intel.offsets(bytes(q))["signature"] - 4
    q[o] += 1  # signature data length one byte longer than the data
    assert factors(check_tdx(bytes(q), policy)) == {"evidence-format": "fail"}
    q = bytearray(intel.tdx_quote(RD))
    q[o + 4 + 128] = 5  # certification data type 5 where 6 is expected
    assert "certification data type" in detail(check_tdx(bytes(q), policy), "evidence-format")


@pytest.mark.parametrize("kind", ["tdx", "sgx"])
def test_measurement_mismatch(kind, root_path):
    p = Policy.from_dict({
        "roots": {"intel": str(root_path)},
        "tdx": {"mrtd": "00" * 48, "rtmr0": intel.RTMRS[0].hex()},
        "sgx": {"mrenclave": intel.MRENCLAVE.hex(), "mrsigner": "11" * 32},
    })
    build, check = (intel.tdx_quote, check_tdx) if kind == "tdx" else (intel.sgx_quote, check_sgx)
    result = check(build(RD), p)
    assert factors(result)["measurements"] == "fail"
    assert detail(result, "measurements") == ("mrtd differ from the policy" if kind == "tdx" else "mrsigner differ from the policy")


def test_expired_pck_certificate(policy):
    pki = intel.make_pki(leaf_not_after=datetime(2022, 1, 1, tzinfo=UTC))
    p = Policy(roots={"intel": str(pki.write_root(Path(policy.roots["intel"]).with_name("expired-root.pem")))})
    result = check_tdx(intel.tdx_quote(RD, pki=pki), p)
    assert factors(result)["certificate-chain"] == "fail"
    assert "not valid at" in detail(result, "certificate-chain")


def test_intermediate_must_be_a_ca(tmp_path):
    pki = intel.make_pki(intermediate_ca=False)
    p = Policy(roots={"intel": str(pki.write_root(tmp_path / "root.pem"))})
    result = check_tdx(intel.tdx_quote(RD, pki=pki), p)
    assert "not a CA" in detail(result, "certificate-chain")


def test_chain_in_the_wrong_order_fails(policy):
    pki = intel.default_pki()
    q = intel.tdx_quote(RD, chain_pem=pki.chain_pem(pki.inter, pki.pck, pki.root))
    assert factors(check_tdx(q, policy))["certificate-chain"] == "fail"


def test_garbage_chain_fails(policy):
    result = check_tdx(intel.tdx_quote(RD, chain_pem=b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), policy)
    assert factors(result)["certificate-chain"] == "fail"
    assert factors(result)["evidence-signature"] == "fail"


@pytest.mark.filterwarnings("ignore")  # cryptography warns about the mangled certificates
def test_parser_never_raises_on_random_mutations(policy):
    q = intel.tdx_quote(RD)
    import random

    rng = random.Random(7)
    pem_at = q.index(b"-----BEGIN")
    for i in range(1500):
        b = bytearray(q)
        lo = pem_at if i % 2 else 0  # half of the mutations land in the PCK certificate chain
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(lo, len(b))] = rng.choice(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") if lo else rng.randrange(256)
        b = bytes(b[: rng.choice([len(b), rng.randrange(len(b) + 1)])])
        result = check_tdx(b, policy)  # must return a result, never raise
        assert result.factors


# --------------------------------------------------------------------------------------------------
# End to end through verify_attestation


def _document(nonce: str, *, events: tuple = (), models: tuple = ()) -> tuple[dict, bytes]:
    claims = Claims(
        appliance_version="0.1.0",
        variant="cpu",
        binary_kind="package",
        binary_sha256="ab" * 32,
        config_sha256="cd" * 32,
        signing_public_key=base64.b64encode(b"\x01" * 32).decode(),
        signing_kid=key_id(b"\x01" * 32),
        nonce=nonce,
        timestamp=int(intel.NOW),
        provider="tdx",
        models=models,
        runtime_measurements=events,
    )
    raw = claims.encode()
    return raw, report_data(raw)


def _doc(raw: bytes, quote: bytes) -> dict:
    return {
        "version": 1,
        "provider": "tdx",
        "format": "tdx-quote-v4",
        "claims_b64": base64.b64encode(raw).decode(),
        "evidence_b64": base64.b64encode(quote).decode(),
    }


def test_verify_attestation_end_to_end(policy):
    nonce = "5a" * 32
    ev = model_event("tiny", "ef" * 32)
    logged = ({"register": "rtmr3", "algorithm": "sha384", "digest": event_digest(ev).hex(), "event": ev, "extended": True},)
    raw, rd = _document(nonce, events=logged, models=(ModelClaim("tiny", "ef" * 32),))
    rtmrs = (*intel.RTMRS[:3], replay([ev]))
    report = verify_attestation(_doc(raw, intel.tdx_quote(rd, rtmrs=rtmrs)), nonce=nonce, policy=policy, now=intel.NOW)
    got = {f.name: f.status for f in report.factors}
    assert got["event-log"] == "pass" and got["nonce"] == "pass" and got["provider"] == "pass"
    assert got["certificate-chain"] == "pass" and got["tcb-status"] == "skip"


def test_verify_attestation_wrong_nonce(policy):
    raw, rd = _document("5a" * 32)
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_doc(raw, intel.tdx_quote(rd)), nonce="77" * 32, policy=policy, now=intel.NOW)
    assert [f.name for f in e.value.report.failures()] == ["nonce"]


def test_verify_attestation_evidence_for_other_claims(policy):
    raw, _ = _document("5a" * 32)
    _, other_rd = _document("66" * 32)
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_doc(raw, intel.tdx_quote(other_rd)), nonce="5a" * 32, policy=policy, now=intel.NOW)
    assert "report-data" in [f.name for f in e.value.report.failures()]


def test_verify_attestation_rtmr3_that_does_not_replay(policy):
    raw, rd = _document("5a" * 32)
    rtmrs = (*intel.RTMRS[:3], hashlib.sha384(b"unlogged").digest())
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_doc(raw, intel.tdx_quote(rd, rtmrs=rtmrs)), nonce="5a" * 32, policy=policy, now=intel.NOW)
    assert [f.name for f in e.value.report.failures()] == ["event-log"]


def test_verify_attestation_without_the_test_root():
    raw, rd = _document("5a" * 32)
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_doc(raw, intel.tdx_quote(rd)), nonce="5a" * 32, policy=Policy(), now=intel.NOW)
    assert [f.name for f in e.value.report.failures()] == ["certificate-chain"]


def test_intel_module_constants():
    assert _intel.HEADER_LEN + 0x208 == 0x238
    assert FORMATS["tdx-quote-v4"].format == "tdx-quote-v4" and FORMATS["sgx-quote-v3"].format == "sgx-quote-v3"
