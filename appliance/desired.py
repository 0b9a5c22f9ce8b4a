"""What must outlive the worker: the desired models, the worker restarts, the runtime measurement log.

The gunicorn master maps this memory before it forks (anonymous and MAP_SHARED, never a file: the disk
is outside the trust boundary), and every worker it forks inherits the same pages. The worker writes
the desired set after each successful load or unload; a replacement worker, forked after the last
one died (SIGILL in llama.cpp, the OOM killer), reads it at boot and loads every model again.

Each value is one JSON record kept twice (double-buffered): a write goes to the slot that does not
hold the newest good record, with the next generation number, a length and a SHA-256 over all
three. A reader takes the valid slot with the highest generation, so a worker killed in the middle
of a write leaves a torn slot that fails its checksum, and the previous record is read instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import struct
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from appliance.osthreads import Lock, real_lock
from appliance.settings import ModelSettings

__all__ = ["SharedState", "SharedRecord", "DesiredModels", "WorkerDeaths", "MeasurementLog", "StateFull"]

log = logging.getLogger("appliance.web.server")

_MAGIC = b"APS1"
_HEADER = struct.Struct("<4sQI32s")  # magic, generation, payload length, sha256(generation || length || payload)

_T = TypeVar("_T")

CONFIG = "config"
RUNTIME = "runtime"


class StateFull(Exception):
    """A record does not fit its shared slot; the message says how big it is and what fits."""


def _real_lock() -> Lock:
    # Loads run on the hub's pool threads: a greenlet lock (what `threading.Lock` is once gevent has
    # patched the worker) cannot be shared with them.
    return real_lock()


def _digest(generation: int, payload: bytes) -> bytes:
    return hashlib.sha256(struct.pack("<QI", generation, len(payload)) + payload).digest()


class SharedRecord:
    """One JSON value in two slots of shared memory; survives a writer killed mid-write."""

    def __init__(self, buf: memoryview, slot_size: int, what: str) -> None:
        if slot_size <= _HEADER.size or len(buf) < 2 * slot_size:
            raise ValueError(f"{what}: a slot needs more than {_HEADER.size} bytes")
        self._slots = (buf[:slot_size], buf[slot_size : 2 * slot_size])
        self.capacity = slot_size - _HEADER.size
        self.what = what
        self._lock = _real_lock()

    def _slot(self, i: int) -> tuple[int, bytes] | None:
        s = self._slots[i]
        magic, gen, length, digest = _HEADER.unpack_from(s, 0)
        if magic != _MAGIC or gen == 0 or length > self.capacity:
            return None
        payload = bytes(s[_HEADER.size : _HEADER.size + length])
        if _digest(gen, payload) != digest:
            return None  # torn or overwritten: the other slot holds the last good record
        return gen, payload

    def _newest(self) -> tuple[int, int | None, bytes | None]:
        """(generation, slot index, payload) of the newest valid slot; (0, None, None) if none."""
        best: tuple[int, int | None, bytes | None] = (0, None, None)
        for i in (0, 1):
            found = self._slot(i)
            if found is not None and found[0] > best[0]:
                best = (found[0], i, found[1])
        return best

    def read(self) -> tuple[int, Any]:
        """(generation, value) of the last complete write; (0, None) before the first."""
        gen, _, payload = self._newest()
        return (gen, json.loads(payload)) if payload is not None else (0, None)

    def update(self, change: Callable[[Any], _T]) -> _T:
        """Write change(current value) as the next generation; returns the value written."""
        with self._lock:
            gen, idx, payload = self._newest()
            value = change(json.loads(payload) if payload is not None else None)
            data = json.dumps(value, separators=(",", ":"), sort_keys=True).encode()
            if len(data) > self.capacity:
                raise StateFull(f"{self.what} would take {len(data)} bytes; its shared memory holds {self.capacity}")
            target = self._slots[0 if idx is None else 1 - idx]
            # Never the slot holding the newest good record: a write cut short spoils only the older one.
            target[_HEADER.size : _HEADER.size + len(data)] = data
            _HEADER.pack_into(target, 0, _MAGIC, gen + 1, len(data), _digest(gen + 1, data))
            return value


class DesiredModels:
    """The models a worker must serve: the configured ones, plus those loaded at run time, minus unloads.

    Written by the worker (event loop) after a load or an unload succeeds; read by a worker at boot.
    """

    def __init__(self, record: SharedRecord) -> None:
        self._record = record

    def reset(self, configured: Iterable[ModelSettings]) -> None:
        """The master, before the first fork: the configured models, in configuration order."""
        entries = [self._entry(ms, CONFIG) for ms in configured]
        self._record.update(lambda _old: {"models": entries})

    @staticmethod
    def _entry(ms: ModelSettings, origin: str) -> dict[str, Any]:
        return {"origin": origin, "settings": ms.model_dump(mode="json")}

    def _entries(self, value: Any) -> list[dict[str, Any]]:
        return list(value["models"]) if isinstance(value, dict) else []

    def names(self) -> list[str]:
        return [e["settings"]["name"] for e in self._entries(self._record.read()[1])]

    def settings(self) -> list[tuple[str, ModelSettings]]:
        """(origin, settings) in the order to load them again: configured first, then the runtime ones
        in the order they were loaded."""
        entries = self._entries(self._record.read()[1])
        out: list[tuple[str, ModelSettings]] = []
        for origin in (CONFIG, RUNTIME):
            for e in entries:
                if e["origin"] != origin:
                    continue
                try:
                    out.append((origin, ModelSettings.model_validate(e["settings"])))
                except ValueError as err:  # written by this same binary: should never happen
                    log.error("desired model %r has invalid settings; skipped (%s)", e["settings"].get("name"), type(err).__name__)
        return out

    def check_room(self, ms: ModelSettings) -> None:
        """Raise StateFull now if adding `ms` could not be recorded (before an expensive load)."""
        entries = [e for e in self._entries(self._record.read()[1]) if e["settings"]["name"] != ms.name]
        entries.append(self._entry(ms, RUNTIME))
        size = len(json.dumps({"models": entries}, separators=(",", ":"), sort_keys=True).encode())
        if size > self._record.capacity:
            raise StateFull(f"the desired models would take {size} bytes; the shared memory holds {self._record.capacity}")

    def add(self, ms: ModelSettings) -> None:
        """A model loaded at run time (a same-named entry, e.g. a configured model that failed, is replaced)."""

        def change(value: Any) -> dict[str, Any]:
            entries = [e for e in self._entries(value) if e["settings"]["name"] != ms.name]
            return {"models": [*entries, self._entry(ms, RUNTIME)]}

        self._record.update(change)

    def pin(self, name: str, sha256: str) -> None:
        """Record the digest a desired model was loaded with (unless it has one): a restart then reloads
        those bytes or refuses, never a file changed on disk meanwhile."""

        def change(value: Any) -> dict[str, Any]:
            entries = self._entries(value)
            for e in entries:
                if e["settings"]["name"] == name and e["settings"].get("sha256") is None:
                    e["settings"] = {**e["settings"], "sha256": sha256}
            return {"models": entries}

        self._record.update(change)

    def remove(self, name: str) -> bool:
        """Drop a model (unloaded); False if it was not desired."""
        if name not in self.names():
            return False
        self._record.update(lambda v: {"models": [e for e in self._entries(v) if e["settings"]["name"] != name]})
        return True


class WorkerDeaths:
    """Worker deaths the master saw while serving (not its own shutdown), written by the master only."""

    def __init__(self, record: SharedRecord) -> None:
        self._record = record

    def read(self) -> dict[str, Any]:
        value = self._record.read()[1]
        return value if isinstance(value, dict) else {"restarts": 0, "causes": {}, "last": None}

    def record(self, *, pid: int, cause: str, detail: str, wall: float, monotonic: float) -> dict[str, Any]:
        def change(value: Any) -> dict[str, Any]:
            old: dict[str, Any] = value if isinstance(value, dict) else {"restarts": 0, "causes": {}, "last": None}
            causes: dict[str, int] = dict(old["causes"])
            causes[cause] = causes.get(cause, 0) + 1
            last = {"pid": pid, "cause": cause, "detail": detail, "at": wall, "monotonic": monotonic}
            return {"restarts": old["restarts"] + 1, "causes": causes, "last": last}

        return self._record.update(change)


class MeasurementLog:
    """The runtime measurement log (the events extended into RTMR3 / PCR16): the register keeps every
    extend across a worker restart, so the log a verifier replays must keep them too."""

    def __init__(self, record: SharedRecord) -> None:
        self._record = record

    def events(self) -> list[dict[str, Any]]:
        value = self._record.read()[1]
        return list(value["events"]) if isinstance(value, dict) else []

    def replace(self, snapshot: Callable[[], list[dict[str, Any]]]) -> None:
        """Store snapshot(), taken under the record's lock (the log only grows: the last write is the newest)."""
        self._record.update(lambda _old: {"events": snapshot()})


class CpuBackends:
    """The llama.cpp CPU build the worker runs, and builds that killed a worker with SIGILL while
    serving: a replacement worker never chooses those again (the probe passed them, serving did not)."""

    def __init__(self, record: SharedRecord) -> None:
        self._record = record

    def _value(self) -> dict[str, Any]:
        value = self._record.read()[1]
        return value if isinstance(value, dict) else {"in_use": None, "refused": []}

    def choose(self, choice: dict[str, Any] | None, error: str | None = None) -> None:
        """Master: the CPU build the next worker loads (BackendChoice.to_dict()), or why there is none."""
        self._record.update(lambda old: {**(old or {"in_use": None, "refused": []}), "choice": choice, "error": error})

    def chosen(self) -> tuple[dict[str, Any] | None, str | None]:
        value = self._value()
        return value.get("choice"), value.get("error")

    def refused(self) -> dict[tuple[str, bool], str]:
        return {(r["module"], r["extra_buffers"]): r["why"] for r in self._value()["refused"]}

    def in_use(self, module: str, extra_buffers: bool) -> None:
        """Worker: the build it has just loaded."""
        self._record.update(lambda old: {**(old or {"refused": []}), "in_use": {"module": module, "extra_buffers": extra_buffers}})

    def refuse_in_use(self, why: str) -> dict[str, Any] | None:
        """Master: the worker running the build in use died of `why`; never choose it again. Returns it."""
        refused: list[dict[str, Any]] = []

        def change(value: Any) -> dict[str, Any]:
            old: dict[str, Any] = value if isinstance(value, dict) else {"in_use": None, "refused": []}
            if old["in_use"] is not None:
                refused.append(old["in_use"])
                return {**old, "in_use": None, "refused": [*old["refused"], {**old["in_use"], "why": why}]}
            return old

        self._record.update(change)
        return refused[0] if refused else None


class SharedState:
    """The master's memory for its workers: made before the first fork, inherited by every worker."""

    def __init__(
        self,
        configured: Iterable[ModelSettings] = (),
        *,
        models_bytes: int = 1 << 20,
        deaths_bytes: int = 16 << 10,
        measurements_bytes: int = 4 << 20,
        backends_bytes: int = 8 << 10,
    ) -> None:
        sizes = (models_bytes, deaths_bytes, measurements_bytes, backends_bytes)
        # Anonymous and MAP_SHARED (mmap's default): pages are only touched as records are written.
        self._map = mmap.mmap(-1, 2 * sum(sizes))
        view = memoryview(self._map)
        records, offset = [], 0
        whats = ("the desired models", "the worker restarts", "the runtime measurement log", "the CPU backends")
        for size, what in zip(sizes, whats):
            records.append(SharedRecord(view[offset : offset + 2 * size], size, what))
            offset += 2 * size
        self.desired = DesiredModels(records[0])
        self.deaths = WorkerDeaths(records[1])
        self.measurements = MeasurementLog(records[2])
        self.backends = CpuBackends(records[3])
        self.desired.reset(configured)
