"""Stored responses and conversations: JSON records, sealed in memory and (optionally) on disk.

Each record belongs to an owner (the API key's configured name or the client key's id; "" on an open
server) and is sealed with its kind, id and owner as associated data (sealing.py), so the store never
needs to keep who owns what: a record opened by anyone else does not open, and is answered exactly
like one that does not exist.

Limits (`[conversations]`): at most `max_responses` responses and `max_conversations` conversations;
past either, the least recently written record of that kind is evicted; past `memory_budget_bytes`
(the sealed bytes of every record), the least recently written records of either kind, until the
rest fit. A record is forgotten `ttl_seconds` after it was last written. A single record larger than
the whole budget is refused (`RecordTooLarge`).

With a directory, every write goes to disk too, atomically (a temporary file, fsync, rename, fsync of
the directory), one file per record named by its id, holding exactly the sealed bytes, in a
subdirectory named by the sealing key's id (`key_id`, not a secret). A worker restarted by the gunicorn
master derives the same key (sealing.boot_key) and loads that subdirectory again at boot. A full
restart has a new key, so a new, empty subdirectory: the old one can never be opened again (unless the
key came from a TEE, which gives the same key back), and is left for the operator to delete, never
removed here: several processes (replicas) may share one directory, each with its own key.
The disk is outside the trust boundary: it learns how many records there are, their sizes and when
they were written, never their contents or owners. What it can still do is roll a record back to an
older sealed version of itself while the worker is down (the memory copy is authoritative while it
runs); see the README's conversation section.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from appliance.conversations.sealing import Kind, SealingKey, Unsealable, read_header
from appliance.osthreads import real_lock

__all__ = ["ConversationStore", "StoreLimits", "RecordNotFound", "RecordTooLarge", "KINDS", "LoadReport"]

log = logging.getLogger("appliance.conversations")

T = TypeVar("T")

KINDS: tuple[Kind, ...] = ("response", "conversation")
_PREFIX: dict[Kind, str] = {"response": "resp", "conversation": "conv"}
_TOKEN = re.compile(r"^[0-9a-f]{48}$")
_FILE = re.compile(r"^((resp|conv)_[0-9a-f]{48})\.sealed$")
_KEY_DIR = re.compile(r"^[0-9a-f]{16}$")


class RecordNotFound(Exception):
    """No such record for this owner: never stored, expired, evicted, deleted, another owner's, or
    one that does not open (tampered). One error for all, on purpose."""

    def __init__(self, kind: Kind, record_id: str) -> None:
        super().__init__(f"no {kind} {record_id[:80]!r}")
        self.kind = kind
        self.record_id = record_id


class RecordTooLarge(Exception):
    """One record larger than the store's whole memory budget."""

    def __init__(self, kind: Kind, size: int, budget: int) -> None:
        super().__init__(f"the {kind} would take {size} bytes sealed; the store holds {budget}")
        self.kind = kind
        self.size = size
        self.budget = budget


@dataclass(frozen=True)
class StoreLimits:
    max_responses: int = 10_000
    max_conversations: int = 1_000
    ttl_seconds: float = 30 * 86400.0
    memory_budget_bytes: int = 64 << 20


@dataclass(frozen=True)
class LoadReport:
    loaded: int = 0
    other_keys: int = 0
    """Subdirectories of records sealed under other keys (earlier boots, other processes): not read."""
    expired: int = 0
    unreadable: int = 0


@dataclass(frozen=True)
class _Entry:
    sealed: bytes
    written_at: float


def _direct(fn: Callable[[], T]) -> T:
    return fn()


class ConversationStore:
    """The records of one worker. Methods are called from the event loop; only the disk writes may run
    on a pool thread (`run_blocking`, e.g. osthreads.off_loop), and they always write the newest state."""

    def __init__(
        self,
        key: SealingKey,
        limits: StoreLimits,
        *,
        clock: Callable[[], float] = time.time,
        directory: Path | None = None,
        run_blocking: Callable[[Callable[[], None]], None] = _direct,
        new_token: Callable[[], str] = lambda: secrets.token_hex(24),
    ) -> None:
        self._key = key
        self.limits = limits
        self._clock = clock
        self.directory = directory / key.key_id.hex() if directory is not None else None
        """Where this key's records go (None: memory only)."""
        self._root = directory
        self._run_blocking = run_blocking
        self._new_token = new_token
        self._records: dict[Kind, OrderedDict[str, _Entry]] = {k: OrderedDict() for k in KINDS}
        self._bytes = 0
        self._disk_lock = real_lock()  # disk writes, on pool threads, one at a time

    def __repr__(self) -> str:
        return f"ConversationStore(responses={self.count('response')}, conversations={self.count('conversation')})"

    # -- the API -------------------------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        """A fresh id: `prefix` + "_" + 48 hex digits (192 random bits)."""
        token = self._new_token()
        if not _TOKEN.match(token):
            raise ValueError("new_token must give 48 lowercase hex digits")
        return f"{prefix}_{token}"

    def record_id(self, kind: Kind) -> str:
        return self.new_id(_PREFIX[kind])

    def put(self, kind: Kind, record_id: str, owner: str, value: Any) -> None:
        """Store a new record (its id from `record_id`), evicting what the limits require."""
        self._check_id(kind, record_id)
        if record_id in self._records[kind]:
            raise ValueError(f"{kind} {record_id} exists: update it instead")
        touched: list[tuple[Kind, str]] = []
        try:
            self._write(kind, record_id, owner, value, touched)
        finally:
            self._persist(touched)

    def get(self, kind: Kind, record_id: str, owner: str) -> Any:
        """The record's value; RecordNotFound unless it exists, is fresh, and is this owner's."""
        removed: list[tuple[Kind, str]] = []
        try:
            return self._open(kind, record_id, owner, removed)
        finally:
            self._persist(removed)

    def update(self, kind: Kind, record_id: str, owner: str, change: Callable[[Any], T]) -> T:
        """Replace a record with change(its value), which must not block: nothing else runs between the
        read and the write (the disk write comes after both). Returns the new value."""
        touched: list[tuple[Kind, str]] = []
        try:
            value = change(self._open(kind, record_id, owner, touched))
            self._write(kind, record_id, owner, value, touched)
            return value
        finally:
            self._persist(touched)

    def delete(self, kind: Kind, record_id: str, owner: str) -> None:
        touched: list[tuple[Kind, str]] = []
        try:
            self._open(kind, record_id, owner, touched)  # this owner's, and fresh
            entry = self._records[kind].pop(record_id)
            self._bytes -= len(entry.sealed)
            touched.append((kind, record_id))
        finally:
            self._persist(touched)

    def count(self, kind: Kind) -> int:
        return len(self._records[kind])

    @property
    def bytes_used(self) -> int:
        """The sealed bytes held (what memory_budget_bytes bounds)."""
        return self._bytes

    # -- in memory -----------------------------------------------------------------------------

    def _valid(self, kind: Kind, record_id: str) -> bool:
        prefix, sep, token = record_id.partition("_")
        return sep == "_" and prefix == _PREFIX[kind] and bool(_TOKEN.match(token))

    def _check_id(self, kind: Kind, record_id: str) -> None:
        if not self._valid(kind, record_id):
            raise ValueError(f"not a {kind} id: {record_id[:80]!r}")

    def _open(self, kind: Kind, record_id: str, owner: str, touched: list[tuple[Kind, str]]) -> Any:
        touched.extend(self._expire(self._clock()))
        entry = self._records[kind].get(record_id) if self._valid(kind, record_id) else None
        if entry is None:
            raise RecordNotFound(kind, record_id)
        try:
            plain = self._key.open(kind, record_id, owner, entry.sealed)
        except Unsealable:
            raise RecordNotFound(kind, record_id) from None
        return json.loads(plain)

    def _write(self, kind: Kind, record_id: str, owner: str, value: Any, touched: list[tuple[Kind, str]]) -> None:
        """Seal and keep `value` in memory; `touched` gets every record changed, for _persist."""
        now = self._clock()
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
        sealed = self._key.seal(kind, record_id, owner, data, written_at=now)
        if len(sealed) > self.limits.memory_budget_bytes:
            raise RecordTooLarge(kind, len(sealed), self.limits.memory_budget_bytes)
        touched.extend(self._expire(now))
        old = self._records[kind].pop(record_id, None)
        if old is not None:
            self._bytes -= len(old.sealed)
        self._records[kind][record_id] = _Entry(sealed, now)
        self._bytes += len(sealed)
        touched.append((kind, record_id))
        touched.extend(self._evict())

    def _expire(self, now: float) -> list[tuple[Kind, str]]:
        """Forget what is past its time (the oldest written first; a record written under a clock that
        later stepped back stays until its own time comes)."""
        ttl = self.limits.ttl_seconds
        removed: list[tuple[Kind, str]] = []
        for kind in KINDS:
            records = self._records[kind]
            while records:
                record_id, entry = next(iter(records.items()))
                if entry.written_at + ttl > now:
                    break
                records.popitem(last=False)
                self._bytes -= len(entry.sealed)
                removed.append((kind, record_id))
        return removed

    def _evict(self) -> list[tuple[Kind, str]]:
        """The least recently written records, until the counts and the memory budget hold."""
        out: list[tuple[Kind, str]] = []
        caps = {"response": self.limits.max_responses, "conversation": self.limits.max_conversations}
        for kind in KINDS:
            records = self._records[kind]
            while len(records) > caps[kind]:
                record_id, entry = records.popitem(last=False)
                self._bytes -= len(entry.sealed)
                out.append((kind, record_id))
        while self._bytes > self.limits.memory_budget_bytes:
            fronts = [(next(iter(self._records[k].values())).written_at, i, k) for i, k in enumerate(KINDS) if self._records[k]]
            _, _, kind = min(fronts)
            record_id, entry = self._records[kind].popitem(last=False)
            self._bytes -= len(entry.sealed)
            out.append((kind, record_id))
        if out:
            log.info("conversation store full: %d record(s) evicted, least recently written first", len(out),
                     extra={"evicted": len(out)})
        return out

    # -- on disk -------------------------------------------------------------------------------

    def _persist(self, keys: list[tuple[Kind, str]]) -> None:
        if self.directory is None or not keys:
            return
        directory = self.directory
        self._run_blocking(lambda: self._sync(directory, keys))

    def _sync(self, directory: Path, keys: Iterable[tuple[Kind, str]]) -> None:
        """Make the files of `keys` what memory holds now (a pool thread, or the caller's)."""
        with self._disk_lock:
            try:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                log.error("cannot write sealed records to %s: %s", directory, e.strerror or type(e).__name__)
                return
            for kind, record_id in keys:
                entry = self._records[kind].get(record_id)
                path = directory / f"{record_id}.sealed"
                try:
                    if entry is None:
                        path.unlink(missing_ok=True)
                    else:
                        _write_atomically(directory, path, entry.sealed, secrets.token_hex(4))
                except OSError as e:  # the memory copy still serves; a worker restart would lose it
                    log.error("cannot write a sealed %s to %s: %s", kind, directory, e.strerror or type(e).__name__)

    def load(self) -> LoadReport:
        """Read this key's sealed records (at boot, before serving); expired ones are removed, leftover
        temporary files too. Other keys' subdirectories are counted, never read or removed."""
        if self.directory is None or self._root is None:
            return LoadReport()
        self._root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory.mkdir(mode=0o700, exist_ok=True)
        now = self._clock()
        found: list[tuple[float, Kind, str, bytes]] = []
        expired = unreadable = 0
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                path.unlink(missing_ok=True)
                continue
            m = _FILE.match(path.name)
            if m is None or not path.is_file() or path.is_symlink():
                unreadable += 1
                continue
            try:
                if path.stat().st_size > self.limits.memory_budget_bytes:
                    unreadable += 1
                    continue
                data = path.read_bytes()
            except OSError:
                unreadable += 1
                continue
            header = read_header(data)
            kind: Kind = "response" if m.group(2) == "resp" else "conversation"
            if header is None or header.kind != kind or header.key_id != self._key.key_id:
                unreadable += 1
                continue
            if header.written_at + self.limits.ttl_seconds <= now:
                expired += 1
                path.unlink(missing_ok=True)
                continue
            found.append((header.written_at, kind, m.group(1), data))
        for written_at, kind, record_id, data in sorted(found):
            self._records[kind][record_id] = _Entry(data, written_at)
            self._bytes += len(data)
        self._persist(self._evict())
        others = sum(1 for p in self._root.iterdir() if _KEY_DIR.match(p.name) and p != self.directory and p.is_dir())
        report = LoadReport(len(found), others, expired, unreadable)
        if others:
            log.warning("%s holds %d director(y/ies) of records sealed under other keys (earlier boots: a full restart "
                        "loses access by design; or other processes sharing it): not read here; delete what no "
                        "running process uses", self._root, others)
        if unreadable:
            log.warning("%d file(s) in %s are not sealed records of this store under this key; left as they are",
                        unreadable, self.directory)
        return report


def _write_atomically(directory: Path, path: Path, data: bytes, tag: str) -> None:
    tmp = directory / f".{path.name}.{tag}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
