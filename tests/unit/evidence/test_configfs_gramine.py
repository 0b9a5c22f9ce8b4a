"""The configfs-tsm and Gramine evidence providers, against stand-ins that behave like the kernel's
configfs tree and Gramine's /dev/attestation (tests/fixtures/tee/configfs.py), and against real
temporary directories through the providers' default file operations.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from appliance.evidence import MeasurementEvent, ProviderError, detect_provider  # noqa: E402
from appliance.evidence.configfs import MAX_OUTBLOB, ConfigfsTsmProvider, FileOps  # noqa: E402
from appliance.evidence.gramine import GramineProvider  # noqa: E402
from attestation.claims import Claims, ModelClaim, report_data  # noqa: E402
from attestation.formats import FORMATS  # noqa: E402
from attestation.measurements import event_digest, model_event  # noqa: E402
from attestation.policy import Policy  # noqa: E402
from attestation.signing import key_id  # noqa: E402
from attestation.verify import verify_attestation  # noqa: E402
from tests.fixtures.tee import intel  # noqa: E402
from tests.fixtures.tee.configfs import FakeConfigfs, GramineDir, RealDirConfigfs  # noqa: E402

RD = hashlib.sha512(b"report data").digest()
CFG_ROOT = Path("/sys/kernel/config/tsm/report")


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Policy:
    path = intel.default_pki().write_root(tmp_path_factory.mktemp("roots") / "root.pem")
    return Policy(roots={"intel": str(path)})


def passes(evidence, policy: Policy, rd: bytes = RD) -> bool:
    result = FORMATS[evidence.format].check(evidence.data, evidence.aux, report_data=rd, policy=policy, now=intel.NOW)
    return all(f.status != "fail" for f in result.factors) and result.provider == evidence.provider


def provider_for(fake: FakeConfigfs, **kw) -> tuple[ConfigfsTsmProvider, list[float]]:
    sleeps: list[float] = []
    p = ConfigfsTsmProvider(fake.root, rtmr_path=FakeConfigfs.DEFAULT_RTMR, fs=fake, sleep=sleeps.append, **kw)
    return p, sleeps


def event(name: str = "tiny", sha: str = "ef" * 32) -> MeasurementEvent:
    desc = model_event(name, sha)
    return MeasurementEvent(register="rtmr3", algorithm="sha384", digest=event_digest(desc).hex(), description=desc)


# --------------------------------------------------------------------------------------------------
# configfs-tsm: TDX


def test_tdx_quote_through_configfs(policy):
    fake = FakeConfigfs()
    p, sleeps = provider_for(fake)
    ev = p.evidence(RD)
    assert (ev.provider, ev.format, ev.aux) == ("tdx", "tdx-quote-v4", None)
    assert ev.data[0x238:0x278] == RD
    assert passes(ev, policy)
    assert fake.entries == {} and sleeps == []
    name = fake.created[-1]
    assert [op for op in fake.ops] == [
        f"mkdir {name}", "write inblob", "read generation", "read outblob", "read provider",
        "read auxblob", "read generation", f"rmdir {name}",
    ]


def test_each_request_uses_a_new_entry(policy):
    fake = FakeConfigfs()
    p, _ = provider_for(fake)
    p.evidence(RD)
    p.evidence(hashlib.sha512(b"second").digest())
    assert len(set(fake.created)) == 2 and fake.entries == {}


def test_name_is_probed_from_the_provider_attribute():
    fake = FakeConfigfs()
    p, _ = provider_for(fake)
    assert p.name == "tdx" and p.runtime_register == "rtmr3"
    assert fake.entries == {}  # the probe entry is removed
    assert fake.ops[1] == "read provider"
    assert p.name == "tdx" and len(fake.created) == 1  # probed once


def test_report_data_must_be_64_bytes():
    p, _ = provider_for(FakeConfigfs())
    for bad in (b"", b"x" * 63, b"x" * 65, "x" * 64):
        with pytest.raises(ProviderError):
            p.evidence(bad)


def test_ebusy_is_retried_with_backoff(policy):
    fake = FakeConfigfs()
    fake.busy = {"mkdir": 2, "read:outblob": 1}
    p, sleeps = provider_for(fake, backoff=0.01)
    ev = p.evidence(RD)
    assert passes(ev, policy)
    assert sleeps == [0.01, 0.02, 0.04]
    assert fake.entries == {}  # the attempt that hit EBUSY on outblob removed its entry


def test_ebusy_forever_gives_up():
    fake = FakeConfigfs()
    fake.busy = {"read:outblob": 100}
    p, sleeps = provider_for(fake, attempts=4)
    with pytest.raises(ProviderError, match="busy"):
        p.evidence(RD)
    assert len(sleeps) == 3 and fake.entries == {}


def test_generation_race_is_retried(policy):
    fake = FakeConfigfs()
    fake.races = 2
    p, sleeps = provider_for(fake)
    ev = p.evidence(RD)
    assert ev.data[0x238:0x278] == RD and passes(ev, policy)
    assert len(sleeps) == 2 and fake.entries == {}


def test_generation_race_forever_fails():
    fake = FakeConfigfs()
    fake.races = 100
    p, _ = provider_for(fake, attempts=3)
    with pytest.raises(ProviderError, match="another writer"):
        p.evidence(RD)
    assert fake.entries == {}


def test_outblob_without_our_report_data_is_retried_then_refused():
    fake = FakeConfigfs(make_quote=lambda rd: intel.tdx_quote(bytes(64)))
    p, _ = provider_for(fake, attempts=2)
    with pytest.raises(ProviderError, match="report data"):
        p.evidence(RD)
    assert len(fake.created) == 2 and fake.entries == {}


def test_oversized_outblob_is_refused():
    fake = FakeConfigfs()
    fake.oversize = True
    p, _ = provider_for(fake)
    with pytest.raises(ProviderError, match=str(MAX_OUTBLOB)):
        p.evidence(RD)
    assert len(fake.created) == 1 and fake.entries == {}  # not retried


def test_missing_auxblob_is_fine(policy):
    fake = FakeConfigfs(auxblob=None)
    p, _ = provider_for(fake)
    assert p.evidence(RD).aux is None


def test_rmdir_ebusy_is_retried():
    fake = FakeConfigfs()
    fake.busy = {"rmdir": 1}
    p, _ = provider_for(fake)
    p.evidence(RD)
    assert fake.entries == {}


def test_other_errors_are_provider_errors():
    fake = FakeConfigfs(root="/sys/kernel/config/tsm/report")
    p = ConfigfsTsmProvider("/elsewhere", fs=fake, sleep=lambda s: None)
    with pytest.raises(ProviderError, match="No such file"):
        p.evidence(RD)
    fake = FakeConfigfs(provider="arm_cca_guest", make_quote=lambda rd: rd)
    p, _ = provider_for(fake)
    with pytest.raises(ProviderError, match="unsupported TSM provider"):
        p.evidence(RD)
    assert p.name == "configfs-tsm" and fake.entries == {}


def test_concurrent_requests_get_their_own_quotes():
    fake = FakeConfigfs()
    p, _ = provider_for(fake)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        rd = hashlib.sha512(str(i).encode()).digest()
        try:
            for _ in range(3):
                assert p.evidence(rd).data[0x238:0x278] == rd
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and fake.entries == {}


# --------------------------------------------------------------------------------------------------
# configfs-tsm: SEV-SNP


def test_sev_snp_report_through_configfs():
    fake = FakeConfigfs(provider="sev_guest", auxblob=b"certificate table")
    p, _ = provider_for(fake)
    ev = p.evidence(RD)
    assert (ev.provider, ev.format, ev.aux) == ("sev-snp", "sev-snp-report", b"certificate table")
    assert len(ev.data) == 1184 and ev.data[0x50:0x90] == RD
    assert p.name == "sev-snp" and p.runtime_register == "none"
    assert p.extend(event()) is False
    assert "write rtmr3" not in fake.ops


# --------------------------------------------------------------------------------------------------
# RTMR3 runtime measurements


def test_extend_rtmr3_then_verify_the_event_log(policy):
    """Provider extends RTMR3 as the TDX module would; the verifier replays the log to the same value."""
    fake = FakeConfigfs()
    fake.make_quote = lambda rd: intel.tdx_quote(rd, rtmrs=(*intel.RTMRS[:3], fake.rtmr3))
    p, _ = provider_for(fake)
    ev = event()
    assert p.extend(ev) is True
    assert fake.rtmr3 == hashlib.sha384(bytes(48) + bytes.fromhex(ev.digest)).digest()

    nonce = "3c" * 32
    claims = Claims(
        appliance_version="0.1.0", variant="cpu", binary_kind="package", binary_sha256="ab" * 32,
        config_sha256="cd" * 32, signing_public_key=base64.b64encode(b"\x02" * 32).decode(),
        signing_kid=key_id(b"\x02" * 32), nonce=nonce, timestamp=int(intel.NOW), provider=p.name,
        models=(ModelClaim("tiny", "ef" * 32),), runtime_measurements=({**ev.to_dict(), "extended": True},),
    )
    raw = claims.encode()
    evidence = p.evidence(report_data(raw))
    doc = {
        "version": 1, "provider": evidence.provider, "format": evidence.format,
        "claims_b64": base64.b64encode(raw).decode(), "evidence_b64": base64.b64encode(evidence.data).decode(),
    }
    report = verify_attestation(doc, nonce=nonce, policy=policy, now=intel.NOW)
    assert {f.name: f.status for f in report.factors}["event-log"] == "pass"


def test_extend_without_the_rtmr_file_returns_false():
    fake = FakeConfigfs(rtmr_path=None)
    p, _ = provider_for(fake)
    assert p.extend(event()) is False


def test_extend_refuses_malformed_events():
    p, _ = provider_for(FakeConfigfs())
    with pytest.raises(ProviderError):
        p.extend(MeasurementEvent(register="rtmr3", algorithm="sha384", digest="ab" * 32))
    with pytest.raises(ProviderError):
        p.extend(MeasurementEvent(register="rtmr3", algorithm="sha384", digest="zz" * 48))
    with pytest.raises(ProviderError):
        p.extend(MeasurementEvent(register="rtmr2", algorithm="sha384", digest="ab" * 48))


def test_extend_write_error_is_a_provider_error():
    fake = FakeConfigfs()
    p, _ = provider_for(fake)
    assert p.name == "tdx"

    def refuse(path, data):
        raise OSError(errno.EPERM, "Operation not permitted")

    fake.write = refuse
    with pytest.raises(ProviderError, match="not permitted"):
        p.extend(event())


# --------------------------------------------------------------------------------------------------
# The real file operations, on real temporary directories


def test_real_files_configfs_semantics(tmp_path, policy):
    root = tmp_path / "report"
    root.mkdir()
    rtmr = tmp_path / "rtmr3:sha384"
    rtmr.write_bytes(b"")
    fs = RealDirConfigfs(root)
    p = ConfigfsTsmProvider(root, rtmr_path=rtmr, fs=fs)
    ev = p.evidence(RD)
    assert ev.provider == "tdx" and passes(ev, policy)
    assert list(root.iterdir()) == []  # every entry removed, attributes and all
    e = event()
    assert p.extend(e) is True
    assert rtmr.read_bytes() == bytes.fromhex(e.digest)  # exactly the 48 bytes, one write


def test_default_file_ops_on_a_plain_directory_fail_cleanly(tmp_path):
    """A directory that is not configfs: mkdir works, no attributes appear; the entry is removed."""
    p = ConfigfsTsmProvider(tmp_path, rtmr_path=tmp_path / "absent")
    assert isinstance(p.fs, FileOps)
    with pytest.raises(ProviderError):
        p.evidence(RD)
    assert list(tmp_path.iterdir()) == []
    assert p.name == "configfs-tsm" and p.extend(event()) is False
    assert list(tmp_path.iterdir()) == []


def test_file_ops_read_limit_and_write(tmp_path):
    fs = FileOps()
    f = tmp_path / "blob"
    f.write_bytes(b"x" * 100)
    assert fs.read(f, 10) == b"x" * 11  # one more than the limit: the caller sees "too large"
    assert fs.read(f, 1000) == b"x" * 100
    assert fs.write(f, b"y" * 64) == 64
    assert f.read_bytes() == b"y" * 64 + b"x" * 36  # no truncation: configfs attributes are not files
    with pytest.raises(FileNotFoundError):
        fs.write(tmp_path / "missing", b"z")  # never creates files
    fs.mkdir(tmp_path / "d")
    assert fs.exists(tmp_path / "d")
    fs.rmdir(tmp_path / "d")
    assert not fs.exists(tmp_path / "d")


def test_detect_provider_finds_configfs_and_gramine(tmp_path):
    cfg = tmp_path / "tsm"
    cfg.mkdir()
    gram = tmp_path / "attestation"
    gram.mkdir()
    (gram / "quote").write_bytes(b"")
    found = detect_provider("auto", configfs_root=cfg, nsm_device=tmp_path / "nsm", gramine_root=gram)
    assert isinstance(found, ConfigfsTsmProvider) and found.root == cfg
    found = detect_provider("gramine-sgx", configfs_root=cfg, nsm_device=tmp_path / "nsm", gramine_root=gram)
    assert isinstance(found, GramineProvider) and found.root == gram


# --------------------------------------------------------------------------------------------------
# Gramine


def test_gramine_quote(tmp_path, policy):
    fs = GramineDir(tmp_path)
    p = GramineProvider(tmp_path, fs=fs)
    ev = p.evidence(RD)
    assert (ev.provider, ev.format, ev.aux) == ("gramine-sgx", "sgx-quote-v3", None)
    assert (tmp_path / "user_report_data").read_bytes() == RD
    assert passes(ev, policy)
    assert p.name == "gramine-sgx" and p.runtime_register == "none"
    assert p.extend(event()) is False


def test_gramine_default_file_ops_with_a_prepared_directory(tmp_path, policy):
    (tmp_path / "user_report_data").write_bytes(bytes(64))
    (tmp_path / "quote").write_bytes(intel.sgx_quote(RD))
    p = GramineProvider(tmp_path)
    assert passes(p.evidence(RD), policy)
    assert (tmp_path / "user_report_data").read_bytes() == RD
    with pytest.raises(ProviderError, match="does not carry"):
        p.evidence(hashlib.sha512(b"another request").digest())


@pytest.mark.parametrize("kind", ["none", "epid"])
def test_gramine_needs_dcap(tmp_path, kind):
    p = GramineProvider(tmp_path, fs=GramineDir(tmp_path, attestation_type=kind))
    with pytest.raises(ProviderError, match="DCAP"):
        p.evidence(RD)


def test_gramine_errors(tmp_path):
    with pytest.raises(ProviderError, match="user_report_data"):
        GramineProvider(tmp_path / "absent").evidence(RD)
    (tmp_path / "user_report_data").write_bytes(bytes(64))
    with pytest.raises(ProviderError, match="quote"):
        GramineProvider(tmp_path).evidence(RD)
    with pytest.raises(ProviderError, match="64 bytes"):
        GramineProvider(tmp_path).evidence(b"short")
    p = GramineProvider(tmp_path, fs=GramineDir(tmp_path, make_quote=lambda rd: intel.sgx_quote(rd, padding=64 * 1024)))
    with pytest.raises(ProviderError, match="larger"):
        p.evidence(RD)


def test_gramine_serializes_write_then_read(tmp_path):
    p = GramineProvider(tmp_path, fs=GramineDir(tmp_path))
    errors: list[BaseException] = []

    def run(i: int) -> None:
        rd = hashlib.sha512(f"req {i}".encode()).digest()
        try:
            for _ in range(3):
                assert p.evidence(rd).data[0x170:0x1B0] == rd
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_no_leftover_entries_after_failures(tmp_path):
    root = tmp_path / "report"
    root.mkdir()
    fs = RealDirConfigfs(root, make_quote=lambda rd: b"\x00" * 100)  # never carries our report data
    p = ConfigfsTsmProvider(root, fs=fs, attempts=2, sleep=lambda s: None)
    with pytest.raises(ProviderError):
        p.evidence(RD)
    assert os.listdir(root) == []
