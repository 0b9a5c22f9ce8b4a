"""The sealed conversation store: sealing, ownership, limits, time to live, and the directory it keeps,
with an injected clock and randomness (appliance/conversations)."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest

from appliance.conversations import (
    ConversationStore,
    RecordNotFound,
    RecordTooLarge,
    SealingKey,
    StoreLimits,
    Unsealable,
    boot_key,
)
from appliance.trust.identity import Identity

ROOT = Path(__file__).resolve().parents[3]
ALICE, BOB = "alice", "bob"


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Tokens:
    """Deterministic ids: 48 hex digits counting up."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.n:048x}"


def make(tmp: Path | None = None, *, key: SealingKey | None = None, clock: Clock | None = None, **limits) -> ConversationStore:
    return ConversationStore(key or SealingKey.generate(), StoreLimits(**limits), clock=clock or Clock(),
                             directory=tmp, new_token=Tokens())


# ---------------------------------------------------------------------------------------------
# Sealing


def test_a_record_round_trips_and_is_sealed_in_memory():
    store = make()
    rid = store.record_id("response")
    value = {"response": {"id": rid, "text": "the secret answer"}, "input_items": []}
    store.put("response", rid, ALICE, value)
    assert store.get("response", rid, ALICE) == value
    sealed = store._records["response"][rid].sealed
    assert b"secret answer" not in sealed and b"alice" not in sealed
    assert "secret" not in repr(store) and repr(SealingKey.generate()) == "SealingKey(source='random')"


def test_another_owner_gets_not_found_exactly_like_a_missing_record():
    store = make()
    rid = store.record_id("conversation")
    store.put("conversation", rid, ALICE, {"items": []})
    with pytest.raises(RecordNotFound) as other:
        store.get("conversation", rid, BOB)
    with pytest.raises(RecordNotFound) as missing:
        store.get("conversation", store.record_id("conversation"), BOB)
    assert type(other.value) is type(missing.value)
    with pytest.raises(RecordNotFound):
        store.delete("conversation", rid, BOB)
    with pytest.raises(RecordNotFound):
        store.update("conversation", rid, BOB, lambda v: {"items": ["x"]})
    assert store.get("conversation", rid, ALICE) == {"items": []}  # untouched by Bob's tries
    with pytest.raises(RecordNotFound):
        store.get("response", rid, ALICE)  # another kind


def test_the_id_owner_kind_and_time_are_bound_to_the_ciphertext():
    key = SealingKey.generate()
    sealed = key.seal("response", "resp_1", ALICE, b"data", written_at=5.0)
    assert key.open("response", "resp_1", ALICE, sealed) == b"data"
    for kind, rid, owner in (("conversation", "resp_1", ALICE), ("response", "resp_2", ALICE), ("response", "resp_1", "")):
        with pytest.raises(Unsealable):
            key.open(kind, rid, owner, sealed)
    redated = bytearray(sealed)
    redated[24] ^= 1  # inside the clear header's time
    with pytest.raises(Unsealable):
        key.open("response", "resp_1", ALICE, bytes(redated))
    with pytest.raises(Unsealable):
        SealingKey.generate().open("response", "resp_1", ALICE, sealed)


def test_nonces_come_from_the_injected_randomness():
    calls: list[int] = []

    def random_bytes(n: int) -> bytes:
        calls.append(n)
        return bytes(n)

    key = SealingKey.generate(random_bytes)
    a = key.seal("response", "resp_1", ALICE, b"x", written_at=0)
    b = key.seal("response", "resp_1", ALICE, b"x", written_at=0)
    assert calls == [32, 12, 12] and a == b  # same key, nonce, input: the randomness is really what is used


def test_the_identity_key_derives_the_same_sealing_key_and_another_identity_does_not():
    identity = Identity()
    a, b = SealingKey.for_identity(identity), SealingKey.for_identity(identity)
    sealed = a.seal("conversation", "conv_1", ALICE, b"x", written_at=1)
    assert b.open("conversation", "conv_1", ALICE, sealed) == b"x" and a.key_id == b.key_id
    with pytest.raises(Unsealable):
        SealingKey.for_identity(Identity()).open("conversation", "conv_1", ALICE, sealed)


def test_a_tee_sealing_secret_is_preferred_when_the_provider_has_one():
    class Tee:
        def sealing_secret(self) -> bytes:
            return b"\x07" * 32

    identity = Identity()
    tee_key = boot_key(identity, Tee())
    assert tee_key.source == "tee" and boot_key(Identity(), Tee()).key_id == tee_key.key_id  # survives a restart
    assert boot_key(identity, object()).source == "identity"
    assert boot_key(identity, None).key_id == SealingKey.for_identity(identity).key_id != tee_key.key_id


# ---------------------------------------------------------------------------------------------
# Limits and time


def test_records_expire_ttl_seconds_after_their_last_write():
    clock = Clock()
    store = make(clock=clock, ttl_seconds=100)
    rid = store.record_id("conversation")
    store.put("conversation", rid, ALICE, {"n": 0})
    clock.now += 60
    store.update("conversation", rid, ALICE, lambda v: {"n": 1})
    clock.now += 99
    assert store.get("conversation", rid, ALICE) == {"n": 1}
    clock.now += 1
    with pytest.raises(RecordNotFound):
        store.get("conversation", rid, ALICE)
    assert store.count("conversation") == 0 and store.bytes_used == 0


def test_past_a_count_the_least_recently_written_record_of_that_kind_is_evicted():
    clock = Clock()
    store = make(clock=clock, max_responses=2, max_conversations=5)
    ids = [store.record_id("response") for _ in range(3)]
    conv = store.record_id("conversation")
    store.put("conversation", conv, ALICE, {})
    for rid in ids:
        clock.now += 1
        store.put("response", rid, ALICE, {"id": rid})
    with pytest.raises(RecordNotFound):
        store.get("response", ids[0], ALICE)
    assert store.get("response", ids[1], ALICE) and store.get("conversation", conv, ALICE) == {}
    clock.now += 1
    c2 = store.record_id("conversation")
    store.put("conversation", c2, ALICE, {})
    assert store.count("response") == 2 and store.count("conversation") == 2


def test_past_the_memory_budget_the_oldest_records_of_either_kind_go():
    clock = Clock()
    store = make(clock=clock, memory_budget_bytes=1000)
    first = store.record_id("conversation")
    store.put("conversation", first, ALICE, {"pad": "x" * 300})
    clock.now += 1
    second = store.record_id("response")
    store.put("response", second, ALICE, {"pad": "x" * 300})
    clock.now += 1
    store.update("conversation", first, ALICE, lambda v: v)  # written again: now the newest
    clock.now += 1
    third = store.record_id("response")
    store.put("response", third, ALICE, {"pad": "x" * 300})
    assert store.bytes_used <= 1000
    with pytest.raises(RecordNotFound):
        store.get("response", second, ALICE)
    assert store.get("conversation", first, ALICE) and store.get("response", third, ALICE)
    with pytest.raises(RecordTooLarge):
        store.put("response", store.record_id("response"), ALICE, {"pad": "x" * 2000})
    assert store.get("conversation", first, ALICE)  # a refused record evicts nothing


def test_ids_that_are_not_the_stores_never_reach_the_disk(tmp_path):
    store = make(tmp_path)
    for bad in ("../../etc/passwd", "resp_", "resp_" + "g" * 48, "conv_" + "0" * 48, "", "resp_" + "0" * 48 + "/x"):
        with pytest.raises(RecordNotFound):
            store.get("response", bad, ALICE)
    with pytest.raises(ValueError):
        store.put("response", "../escape", ALICE, {})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# On disk


def test_records_persist_atomically_and_reload_under_the_same_key(tmp_path):
    key = SealingKey.generate()
    store = make(tmp_path, key=key)
    rid, cid = store.record_id("response"), store.record_id("conversation")
    store.put("response", rid, ALICE, {"answer": "the secret answer"})
    store.put("conversation", cid, BOB, {"items": [1, 2]})
    assert [p.name for p in tmp_path.iterdir()] == [key.key_id.hex()]  # one subdirectory per sealing key
    files = sorted(p.name for p in store.directory.iterdir())
    assert files == sorted([f"{rid}.sealed", f"{cid}.sealed"])  # no temporary files left
    for p in store.directory.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert b"secret answer" not in p.read_bytes() and b"alice" not in p.read_bytes()
    assert (store.directory / f"{rid}.sealed").read_bytes() == store._records["response"][rid].sealed

    again = make(tmp_path, key=key)
    report = again.load()
    assert report.loaded == 2 and report.other_keys == 0
    assert again.get("response", rid, ALICE) == {"answer": "the secret answer"}
    assert again.get("conversation", cid, BOB) == {"items": [1, 2]}
    with pytest.raises(RecordNotFound):
        again.get("conversation", cid, ALICE)
    again.update("conversation", cid, BOB, lambda v: {"items": [3]})
    again.delete("response", rid, ALICE)
    assert [p.name for p in store.directory.iterdir()] == [f"{cid}.sealed"]
    third = make(tmp_path, key=key)
    third.load()
    assert third.get("conversation", cid, BOB) == {"items": [3]}


def test_a_tampered_or_renamed_file_is_rejected(tmp_path):
    key = SealingKey.generate()
    store = make(tmp_path, key=key)
    a, b = store.record_id("response"), store.record_id("response")
    store.put("response", a, ALICE, {"v": "a"})
    store.put("response", b, ALICE, {"v": "b"})
    d = store.directory
    path = d / f"{a}.sealed"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the tag
    path.write_bytes(bytes(data))
    (d / f"{b}.sealed").rename(d / f"resp_{'f' * 48}.sealed")  # b's bytes under another id
    (d / "notes.txt").write_text("not a record")
    again = make(tmp_path, key=key)
    report = again.load()
    assert report.unreadable == 1 and (d / "notes.txt").exists()
    for rid in (a, f"resp_{'f' * 48}", b):
        with pytest.raises(RecordNotFound):
            again.get("response", rid, ALICE)


def test_another_keys_records_are_never_read_nor_removed_and_expired_ones_are(tmp_path):
    clock = Clock()
    old = make(tmp_path, key=SealingKey.generate(), clock=clock, ttl_seconds=100)
    rid = old.record_id("response")
    old.put("response", rid, ALICE, {"v": 1})
    restarted = make(tmp_path, key=SealingKey.generate(), clock=clock)  # a full restart (or a replica): a new key
    report = restarted.load()
    assert report.other_keys == 1 and report.loaded == 0
    with pytest.raises(RecordNotFound):
        restarted.get("response", rid, ALICE)
    assert (old.directory / f"{rid}.sealed").is_file()  # not this process's to remove

    same_key = SealingKey.generate()
    store = make(tmp_path, key=same_key, clock=clock, ttl_seconds=100)
    store.put("response", store.record_id("response"), ALICE, {"v": 2})
    clock.now += 100
    later = make(tmp_path, key=same_key, clock=clock, ttl_seconds=100)
    assert later.load().expired == 1 and list(later.directory.iterdir()) == []


def test_disk_writes_go_through_run_blocking(tmp_path):
    ran: list[str] = []

    def run_blocking(fn):
        ran.append("write")
        fn()

    store = ConversationStore(SealingKey.generate(), StoreLimits(), clock=Clock(), directory=tmp_path,
                              run_blocking=run_blocking)
    rid = store.record_id("conversation")
    store.put("conversation", rid, ALICE, {})
    store.get("conversation", rid, ALICE)  # a read writes nothing
    store.delete("conversation", rid, ALICE)
    assert ran == ["write", "write"]


def test_a_failed_disk_write_leaves_the_memory_copy_serving(tmp_path, caplog):
    store = make(tmp_path / "d")
    store.load()  # creates it
    store.directory.rmdir()
    store.directory.write_text("a file where the directory was")  # every write now fails, root's too
    rid = store.record_id("response")
    store.put("response", rid, ALICE, {"v": 1})
    assert store.get("response", rid, ALICE) == {"v": 1}
    assert "cannot write sealed records" in caplog.text


# ---------------------------------------------------------------------------------------------
# The room


def test_the_conversation_store_knows_neither_http_nor_the_engine():
    found = []
    for path in sorted((ROOT / "appliance" / "conversations").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in ("falcon", "gunicorn") or name.startswith(("appliance.web", "appliance.engine")):
                    found.append(f"{path.name} imports {name}")
    assert found == []
