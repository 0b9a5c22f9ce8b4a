"""AWS Nitro: COSE_Sign1 attestation documents, the NSM provider over a fake NSM, and the round trip."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import random
import sys
import types
from pathlib import Path

import cbor2
import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.evidence import MeasurementEvent, ProviderError, detect_provider  # noqa: E402
from appliance.evidence import nitro as nitro_mod  # noqa: E402
from appliance.evidence.attestor import Attestor  # noqa: E402
from appliance.evidence.nitro import NSM_IOCTL_RAW, NitroProvider, NsmDevice  # noqa: E402
from appliance.settings import Settings  # noqa: E402
from appliance.trust.identity import Identity  # noqa: E402
from attestation.claims import report_data  # noqa: E402
from attestation.formats import FORMATS  # noqa: E402
from attestation.measurements import event_digest, model_event, replay  # noqa: E402
from attestation.policy import Policy  # noqa: E402
from attestation.verify import AttestationFailed, verify_attestation  # noqa: E402
from tests.fixtures.tee import nitro as N  # noqa: E402

NITRO = FORMATS["nitro-cose-sign1"]
RD = hashlib.sha512(b"claims").digest()
BOOT_PCRS = {i: N.IMAGE_PCRS.get(i, bytes(48)) for i in range(16)}
TS = int(N.NOW * 1000)


@pytest.fixture
def policy(tmp_path) -> Policy:
    return Policy(roots={"aws": N.write_root(tmp_path)}, nitro={"pcr0": N.IMAGE_PCRS[0].hex(), "pcr8": N.IMAGE_PCRS[8].hex()})


def check(doc: bytes, *, policy: Policy, rd: bytes = RD, now: float = N.NOW):
    res = NITRO.check(doc, None, report_data=rd, policy=policy, now=now)
    return res, {f.name: f for f in res.factors}


def statuses(res) -> dict[str, str]:
    return {f.name: f.status for f in res.factors}


# --------------------------------------------------------------------------------------------------
# The document


@pytest.mark.parametrize("tagged", [False, True])
def test_valid_document_passes_every_factor(policy, tagged):
    res, f = check(N.build_document(user_data=RD, tagged=tagged), policy=policy)
    assert statuses(res) == {
        "evidence-format": "pass", "evidence-signature": "pass", "certificate-chain": "pass", "report-data": "pass",
        "debug": "pass", "measurements": "pass", "tcb-status": "skip", "runtime-register": "skip",
    }
    assert res.provider == "nitro"
    assert res.measurements["pcr0"] == N.IMAGE_PCRS[0].hex() and len(res.measurements) == 16
    assert res.runtime_register is None  # PCR16 not locked, so not in the document


def test_pcr16_in_the_document_is_the_runtime_register(policy):
    pcrs = {**BOOT_PCRS, 16: hashlib.sha384(b"r").digest()}
    res, _ = check(N.build_document(user_data=RD, pcrs=pcrs), policy=policy)
    assert res.runtime_register == pcrs[16] and "runtime-register" not in statuses(res)


def test_nonce_and_public_key_may_be_present(policy):
    doc = N.build_document(user_data=RD, nonce=b"n" * 32, public_key=b"k" * 91)
    assert statuses(check(doc, policy=policy)[0])["report-data"] == "pass"


def test_wrong_report_data(policy):
    assert check(N.build_document(user_data=RD), policy=policy, rd=hashlib.sha512(b"x").digest())[1]["report-data"].status == "fail"


def test_binding_is_user_data_not_nonce(policy):
    f = check(N.build_document(user_data=None, nonce=RD), policy=policy)[1]["report-data"]
    assert f.status == "fail" and "absent" in f.detail
    assert check(N.build_document(user_data=RD[:32]), policy=policy)[1]["report-data"].status == "fail"


def test_debug_mode_fails_unless_allowed(policy):
    pcrs = {i: bytes(48) for i in range(16)}
    doc = N.build_document(user_data=RD, pcrs=pcrs)
    assert check(doc, policy=policy)[1]["debug"].status == "fail"
    p = dataclasses.replace(policy, allow_debug=True, nitro={})
    f = check(doc, policy=p)[1]["debug"]
    assert f.status == "pass" and "allowed by policy" in f.detail


def test_untrusted_root_without_extra_root():
    res, f = check(N.build_document(user_data=RD), policy=Policy())
    assert f["certificate-chain"].status == "fail" and "untrusted root" in f["certificate-chain"].detail
    assert f["evidence-signature"].status == "pass"


def test_self_made_root_named_like_aws_is_not_trusted():
    from attestation.roots import pinned_roots

    ((_, real),) = pinned_roots("aws")
    p = N.make_pki(tag="fake-aws", root_name=real.subject)
    assert check(N.build_document(p, user_data=RD), policy=Policy())[1]["certificate-chain"].status == "fail"


@pytest.mark.parametrize("where", ["signature", "payload", "protected"])
def test_bad_signature_byte_flip(policy, where):
    arr = cbor2.loads(N.build_document(user_data=RD))
    protected, unprotected, payload, sig = arr
    if where == "signature":
        sig = sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]
    elif where == "payload":  # flip a byte inside module_id: still valid CBOR
        i = payload.index(b"enc")
        payload = payload[:i] + b"ENC" + payload[i + 3 :]
    else:
        protected = cbor2.dumps({1: -35, 4: b"kid"})
    doc = cbor2.dumps([protected, unprotected, payload, sig])
    res, f = check(doc, policy=policy)
    assert f["evidence-signature"].status == "fail"


def test_signed_by_another_key(policy):
    other = N.make_pki(tag="other")
    body = N.payload(N.pki(), user_data=RD, pcrs=BOOT_PCRS, timestamp_ms=TS)
    assert check(N.sign_document(N.pki(), body, key=other.leaf_key), policy=policy)[1]["evidence-signature"].status == "fail"


def _doc_with(p, **fields) -> bytes:
    body = N.payload(p, user_data=RD, pcrs=BOOT_PCRS, timestamp_ms=TS)
    body.update(fields)
    return N.sign_document(p, body)


def test_chain_broken(policy):
    p, other = N.pki(), N.make_pki(tag="other")
    # leaf of another PKI (it signs): its issuer is not our intermediate
    body = N.payload(other, user_data=RD, pcrs={i: bytes([1]) * 48 for i in range(3)}, timestamp_ms=TS)
    body["cabundle"] = p.cabundle
    f = check(N.sign_document(other, body), policy=policy)[1]
    assert f["evidence-signature"].status == "pass" and f["certificate-chain"].status == "fail"
    # an intermediate missing from the bundle
    assert check(_doc_with(p, cabundle=p.cabundle[:2]), policy=policy)[1]["certificate-chain"].status == "fail"
    # the bundle out of order
    shuffled = [p.cabundle[0], p.cabundle[2], p.cabundle[1]]
    assert check(_doc_with(p, cabundle=shuffled), policy=policy)[1]["certificate-chain"].status == "fail"


def test_certificates_checked_at_the_document_time(policy):
    p = N.pki()  # leaf valid NOW-1min .. NOW+3h
    late = _doc_with(p, timestamp=int((N.NOW + 4 * 3600) * 1000))
    f = check(late, policy=policy)[1]["certificate-chain"]
    assert f.status == "fail" and "not valid" in f.detail
    early = _doc_with(p, timestamp=int((N.NOW - 3600) * 1000))
    assert check(early, policy=policy)[1]["certificate-chain"].status == "fail"
    # verification time ("now") does not matter: stored documents verify later
    assert check(_doc_with(p), policy=policy, now=N.NOW + 10 * 86400)[1]["certificate-chain"].status == "pass"


def test_leaf_must_not_sign_as_a_ca(policy):
    p = N.pki()
    # leaf placed as an intermediate: not a CA
    doc = _doc_with(p, cabundle=[*p.cabundle, N.der(p.leaf)])
    assert check(doc, policy=policy)[1]["certificate-chain"].status == "fail"


def test_measurement_mismatch(policy):
    pcrs = dict(BOOT_PCRS)
    pcrs[0] = hashlib.sha384(b"another image").digest()
    f = check(N.build_document(user_data=RD, pcrs=pcrs), policy=policy)[1]["measurements"]
    assert f.status == "fail" and "pcr0" in f.detail
    p = dataclasses.replace(policy, nitro={"pcr16": "00" * 48})  # not in the document: never a pass
    assert check(N.build_document(user_data=RD), policy=p)[1]["measurements"].status == "fail"


GOOD = None


def _good() -> bytes:
    global GOOD
    GOOD = GOOD or N.build_document(user_data=RD)
    return GOOD


@pytest.mark.parametrize(
    "make",
    [
        lambda: b"",
        lambda: _good()[:-1],
        lambda: _good()[: len(_good()) // 2],
        lambda: _good() + b"\x00",  # trailing bytes
        lambda: _good() + bytes(0x3000),  # oversized
        lambda: os.urandom(64),
        lambda: b"\xff" * 100,
        lambda: cbor2.dumps(cbor2.CBORTag(98, cbor2.loads(_good()))),  # COSE_Sign (multi), not Sign1
        lambda: cbor2.dumps(cbor2.loads(_good())[:3]),
        lambda: cbor2.dumps({"a": 1}),
        lambda: b"\x9f" + b"".join(cbor2.dumps(x) for x in cbor2.loads(_good())),  # indefinite, no break
    ],
)
def test_malformed_documents_fail_the_format_factor(policy, make):
    res, f = check(make(), policy=policy)
    assert [x.name for x in res.factors] == ["evidence-format"] and f["evidence-format"].status == "fail"


@pytest.mark.parametrize(
    "fields",
    [
        {"digest": "SHA256"},
        {"timestamp": -1},
        {"timestamp": "now"},
        {"pcrs": {}},
        {"pcrs": {0: b"x" * 32}},
        {"pcrs": {32: bytes(48)}},
        {"cabundle": []},
        {"certificate": "not bytes"},
        {"module_id": ""},
        {"user_data": "text"},
        {"certificate": b"not a certificate"},
    ],
)
def test_malformed_payload_fields(policy, fields):
    res, f = check(_doc_with(N.pki(), **fields), policy=policy)
    assert f["evidence-format"].status == "fail"


def test_indefinite_length_payload_as_the_nsm_writes_it(policy):
    p = N.pki()
    body = N.payload(p, user_data=RD, pcrs=BOOT_PCRS, timestamp_ms=TS)
    indefinite = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in body.items()) + b"\xff"
    res, f = check(N.sign_document(p, indefinite), policy=policy)
    assert not [x for x in res.factors if x.status == "fail"]


def test_wrong_algorithm_or_duplicate_keys(policy):
    p = N.pki()
    body = N.payload(p, user_data=RD, pcrs={i: bytes([1]) * 48 for i in range(3)}, timestamp_ms=TS)
    assert check(N.sign_document(p, body, protected=cbor2.dumps({1: -7})), policy=policy)[1]["evidence-format"].status == "fail"
    raw = cbor2.dumps(body)
    dup = b"\xaa" + raw[1:] + cbor2.dumps("user_data") + cbor2.dumps(b"\x00" * 64)  # map(10) with user_data twice
    assert check(N.sign_document(p, dup), policy=policy)[1]["evidence-format"].status == "fail"


def test_random_corruption_never_raises(policy):
    rng = random.Random(99)
    good = _good()
    for _ in range(300):
        d = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(len(d))] ^= 1 << rng.randrange(8)
        res = NITRO.check(bytes(d), None, report_data=RD, policy=policy, now=N.NOW)
        assert any(x.status == "fail" for x in res.factors) or bytes(d) == good


# --------------------------------------------------------------------------------------------------
# Genuine NSM documents against the pinned AWS root G1 (no extra root)


@pytest.mark.parametrize("name", sorted(N.REAL_DOCUMENTS))
def test_real_documents_verify_against_the_pinned_aws_root(name):
    doc = N.real_document(name)
    res, f = check(doc, policy=Policy(), rd=bytes(64), now=0)
    st = statuses(res)
    assert st["evidence-format"] == st["evidence-signature"] == st["certificate-chain"] == st["debug"] == "pass"
    assert "aws.nitro-enclaves (G1)" in f["certificate-chain"].detail
    assert st["report-data"] == "fail"  # their user_data binds something else
    assert sorted(int(k[3:]) for k in res.measurements) == list(range(16))  # only locked PCRs 0..15
    assert st["runtime-register"] == "skip"


def test_real_document_payload_encodings():
    # the NSM has written the payload both as an indefinite-length map and as a definite one
    assert cbor2.loads(N.real_document("us-east-2-2026"))[2][0] == 0xBF
    assert cbor2.loads(N.real_document("us-east-1-2024"))[2][0] == 0xA9


@pytest.mark.parametrize("name", sorted(N.REAL_DOCUMENTS))
def test_real_document_tampered(name):
    arr = cbor2.loads(N.real_document(name))
    payload = arr[2]
    i = payload.index(b"module_id") + 12
    tampered = cbor2.dumps([arr[0], arr[1], payload[:i] + bytes([payload[i] ^ 1]) + payload[i + 1 :], arr[3]])
    assert check(tampered, policy=Policy(), rd=bytes(64), now=0)[1]["evidence-signature"].status == "fail"


# --------------------------------------------------------------------------------------------------
# The provider over the fake NSM


def test_provider_evidence_is_the_nsm_document(policy):
    nsm = N.FakeNsm()
    ev = NitroProvider("/dev/nsm", transport=nsm).evidence(RD)
    assert (ev.provider, ev.format, ev.aux) == ("nitro", "nitro-cose-sign1", None)
    assert nsm.requests[-1] == {"Attestation": {"user_data": RD, "nonce": None, "public_key": None}}
    assert not [x for x in check(ev.data, policy=policy)[0].factors if x.status == "fail"]


def test_provider_extends_pcr16_with_the_event_digest():
    nsm = N.FakeNsm()
    prov = NitroProvider("/dev/nsm", transport=nsm)
    events = [model_event("a", "aa" * 32), model_event("b", "bb" * 32)]
    for e in events:
        assert prov.extend(MeasurementEvent("pcr16", "sha384", event_digest(e).hex(), e)) is True
    assert nsm.requests[0] == {"ExtendPCR": {"index": 16, "data": event_digest(events[0])}}
    assert nsm.pcrs[16] == replay(events)
    assert prov.describe() == (False, replay(events))


def test_provider_refuses_bad_input():
    prov = NitroProvider("/dev/nsm", transport=N.FakeNsm())
    with pytest.raises(ProviderError):
        prov.evidence(b"short")
    with pytest.raises(ProviderError):
        prov.extend(MeasurementEvent("rtmr3", "sha384", "00" * 48))
    with pytest.raises(ProviderError):
        prov.extend(MeasurementEvent("pcr16", "sha256", "00" * 32))
    with pytest.raises(ProviderError):
        prov.extend(MeasurementEvent("pcr16", "sha384", "zz"))


def test_provider_surfaces_nsm_errors_and_garbage():
    nsm = N.FakeNsm()
    prov = NitroProvider("/dev/nsm", transport=nsm)
    assert prov.seal() is True and prov.seal() is False
    with pytest.raises(ProviderError, match="ReadOnlyIndex"):
        prov.extend(MeasurementEvent("pcr16", "sha384", "00" * 48))
    with pytest.raises(ProviderError, match="not CBOR"):
        NitroProvider("/dev/nsm", transport=lambda req: b"\xff").evidence(RD)
    with pytest.raises(ProviderError, match="no document"):
        NitroProvider("/dev/nsm", transport=lambda req: cbor2.dumps({"Attestation": {}})).evidence(RD)
    with pytest.raises(ProviderError, match="InternalError"):
        NitroProvider("/dev/nsm", transport=lambda req: cbor2.dumps({"Error": "InternalError"})).evidence(RD)


def test_fake_nsm_lists_only_locked_pcrs_like_the_device():
    nsm = N.FakeNsm()
    prov = NitroProvider("/dev/nsm", transport=nsm)
    prov.extend(MeasurementEvent("pcr16", "sha384", "11" * 48))
    pcrs = cbor2.loads(cbor2.loads(prov.evidence(RD).data)[2])["pcrs"]
    assert sorted(pcrs) == list(range(16))
    prov.seal()
    pcrs = cbor2.loads(cbor2.loads(prov.evidence(RD).data)[2])["pcrs"]
    assert sorted(pcrs) == list(range(17)) and pcrs[16] == nsm.pcrs[16]


def test_seal_on_evidence_locks_at_the_first_attestation():
    nsm = N.FakeNsm()
    prov = NitroProvider("/dev/nsm", transport=nsm, seal_on_evidence=True)
    prov.extend(MeasurementEvent("pcr16", "sha384", "11" * 48))
    prov.evidence(RD)
    assert nsm.locked[16]
    prov.evidence(RD)  # idempotent
    assert {"LockPCR": {"index": 16}} in nsm.requests and nsm.requests.count({"LockPCR": {"index": 16}}) == 1


# --------------------------------------------------------------------------------------------------
# The real ioctl path, against the fake NSM in place of the kernel driver


def test_ioctl_number_and_struct():
    import ctypes

    assert NSM_IOCTL_RAW == 0xC0200A00
    assert ctypes.sizeof(nitro_mod._NsmRaw) == 32


def test_ioctl_transport_round_trip(tmp_path, monkeypatch, policy):
    dev = tmp_path / "nsm"
    dev.write_bytes(b"")
    nsm = N.FakeNsm()
    monkeypatch.setattr(nitro_mod.fcntl, "ioctl", nsm.ioctl)
    prov = NitroProvider(dev)
    assert isinstance(prov._transport, NsmDevice)
    prov.extend(MeasurementEvent("pcr16", "sha384", "22" * 48))
    prov.seal()
    ev = prov.evidence(RD)
    assert set(nsm.ioctl_calls) == {0xC0200A00}
    res, f = check(ev.data, policy=policy)
    assert not [x for x in res.factors if x.status == "fail"]
    assert res.runtime_register == hashlib.sha384(bytes(48) + bytes.fromhex("22" * 48)).digest()


def test_ioctl_transport_errors(tmp_path, monkeypatch):
    with pytest.raises(ProviderError, match="cannot open"):
        NsmDevice(tmp_path / "absent")(b"\xa0")
    dev = tmp_path / "nsm"
    dev.write_bytes(b"")

    def failing(fd, req, arg, mutate=True):
        raise OSError(25, "Inappropriate ioctl for device")

    monkeypatch.setattr(nitro_mod.fcntl, "ioctl", failing)
    with pytest.raises(ProviderError, match="ENOTTY"):
        NitroProvider(dev).evidence(RD)
    with pytest.raises(ProviderError, match="exceeds"):
        NsmDevice(dev)(bytes(0x1001))


def test_detect_provider_picks_nitro(tmp_path):
    dev = tmp_path / "nsm"
    dev.write_bytes(b"")
    p = detect_provider("nitro", configfs_root=tmp_path / "no-configfs", nsm_device=dev, gramine_root=tmp_path / "no-gramine")
    assert isinstance(p, NitroProvider) and p.runtime_register == "pcr16" and p.name == "nitro"


# --------------------------------------------------------------------------------------------------
# Provider -> attestation -> verify, with models measured into PCR16


class _Models:
    def __init__(self, recs):
        self.recs = recs

    def records(self):
        return self.recs

    def cpu_backend(self):
        return None


def _attestor(nsm, models: dict[str, str], monkeypatch) -> Attestor:
    monkeypatch.setenv("APPLIANCE_VARIANT", "cpu")
    recs = [types.SimpleNamespace(name=n, state="ready", sha256=d, mmap=False) for n, d in models.items()]
    prov = NitroProvider("/dev/nsm", transport=nsm)
    a = Attestor(Settings(), Identity(), _Models(recs), prov, clock=lambda: N.NOW)
    for n, d in models.items():
        a.measure_model(n, d)
    return a


def _document(a: Attestor, nonce: str) -> dict:
    raw = a.claims(nonce).encode()
    ev = a.provider.evidence(report_data(raw))
    return {
        "version": 1, "provider": ev.provider, "format": ev.format,
        "claims_b64": base64.b64encode(raw).decode(), "evidence_b64": base64.b64encode(ev.data).decode(), "aux_b64": None,
    }


MODELS = {"llama": "a1" * 32, "qwen": "b2" * 32}


def test_round_trip_models_replay_to_pcr16(monkeypatch, policy):
    nsm = N.FakeNsm()
    a = _attestor(nsm, MODELS, monkeypatch)
    assert all(e["extended"] for e in a.event_log) and a.event_log[0]["register"] == "pcr16"
    a.provider.seal()
    nonce = "5a" * 32
    report = verify_attestation(_document(a, nonce), nonce=nonce, policy=policy, now=N.NOW)
    st = {f.name: f.status for f in report.factors}
    assert st["event-log"] == "pass" and st["evidence-signature"] == st["certificate-chain"] == st["provider"] == "pass"
    assert "models-measured" not in st
    assert report.measurements["pcr16"] == replay([model_event(n, d) for n, d in MODELS.items()]).hex()


def test_round_trip_tampered_event_log_fails(monkeypatch, policy):
    nsm = N.FakeNsm()
    a = _attestor(nsm, MODELS, monkeypatch)
    a.provider.seal()
    a.event_log.reverse()  # same events, another order: replays to another value
    nonce = "5a" * 32
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_document(a, nonce), nonce=nonce, policy=policy, now=N.NOW)
    assert [f.name for f in e.value.report.failures()] == ["event-log"]


def test_round_trip_model_missing_from_the_log_fails(monkeypatch, policy):
    nsm = N.FakeNsm()
    a = _attestor(nsm, MODELS, monkeypatch)
    a.provider.seal()
    a.event_log.pop()  # a model claimed but its measurement dropped from the log
    nonce = "5a" * 32
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_document(a, nonce), nonce=nonce, policy=policy, now=N.NOW)
    assert {f.name for f in e.value.report.failures()} == {"event-log", "models-measured"}


def test_round_trip_unsealed_pcr16_is_not_attested(monkeypatch, policy):
    nsm = N.FakeNsm()
    a = _attestor(nsm, MODELS, monkeypatch)
    nonce = "5a" * 32
    report = verify_attestation(_document(a, nonce), nonce=nonce, policy=policy, now=N.NOW)
    st = {f.name: f.status for f in report.factors}
    assert st["event-log"] == "skip" and st["runtime-register"] == "skip"


def test_round_trip_model_loaded_after_sealing_is_not_measured(monkeypatch, policy):
    nsm = N.FakeNsm()
    a = _attestor(nsm, {"llama": MODELS["llama"]}, monkeypatch)
    a.provider.seal()
    a.models.recs.append(types.SimpleNamespace(name="qwen", state="ready", sha256=MODELS["qwen"], mmap=False))
    a.measure_model("qwen", MODELS["qwen"])  # ReadOnlyIndex: logged as not extended
    assert a.event_log[-1]["extended"] is False
    nonce = "5a" * 32
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_document(a, nonce), nonce=nonce, policy=policy, now=N.NOW)
    assert [f.name for f in e.value.report.failures()] == ["models-measured"]
