"""configfs-tsm (Linux >= 6.7): TDX quotes and SEV-SNP reports through /sys/kernel/config/tsm/report.

Per request, as Documentation/ABI/testing/configfs-tsm describes:

    mkdir ROOT/NAME                       (a private report entry; the kernel creates its attributes)
    write exactly 64 bytes to inblob      (the report data)
    read generation                       (g1)
    read outblob (<= 32 KiB), provider, auxblob (may be absent or empty)
    read generation                       (g2: if g2 != g1 another writer raced us: retry)
    rmdir ROOT/NAME                       (always)

EBUSY from any step means the TSM is busy: retry with a short backoff. The outblob must also carry
our report data at the format's offset (TDX quote 0x238, SNP report 0x50), which catches a writer
that slipped in between our inblob write and the first generation read.

TDX has a runtime register: `extend()` writes an event's 48-byte digest to the RTMR3 sysfs file
(`rtmr3:sha384`, Linux >= 6.16); the TDX module computes RTMR3' = SHA-384(RTMR3 || digest). When the
file is absent, or on SEV-SNP, `extend()` returns False (the event is logged, not measured).

All file I/O goes through an `fs` object (default: `FileOps`, plain os calls) so tests can drive the
provider against a fixture that behaves like configfs.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from appliance.evidence import Evidence, MeasurementEvent, ProviderError
from appliance.osthreads import real_lock

__all__ = ["ConfigfsTsmProvider", "FileOps", "MAX_OUTBLOB", "DEFAULT_RTMR_PATH"]

log = logging.getLogger("appliance.tee")

MAX_OUTBLOB = 32 * 1024
MAX_SMALL = 4096  # provider, generation
DEFAULT_RTMR_PATH = Path("/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384")

# configfs `provider` value -> (evidence provider, format, offset of the 64 report-data bytes)
KINDS = {
    "tdx_guest": ("tdx", "tdx-quote-v4", 0x238),
    "sev_guest": ("sev-snp", "sev-snp-report", 0x50),
}

_counter = itertools.count(1)

_T = TypeVar("_T")


class FileOps:
    """The file operations the TEE providers use: plain, unbuffered os calls (one syscall per write)."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def exists(self, path: Path) -> bool:
        return os.path.exists(path)

    def read(self, path: Path, limit: int) -> bytes:
        """The file's content, at most `limit + 1` bytes (so a caller can tell it was too large)."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks, n = [], 0
            while n <= limit:
                chunk = os.read(fd, min(65536, limit + 1 - n))
                if not chunk:
                    break
                chunks.append(chunk)
                n += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> int:
        """One write(2) of `data` to an existing file (no create, no truncate); bytes written."""
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)


class _Retry(Exception):
    pass


def _why(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


class ConfigfsTsmProvider:
    def __init__(
        self,
        root: Path | str = Path("/sys/kernel/config/tsm/report"),
        *,
        rtmr_path: Path | str = DEFAULT_RTMR_PATH,
        fs: FileOps | None = None,
        attempts: int = 5,
        backoff: float = 0.02,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.root = Path(root)
        self.rtmr_path = Path(rtmr_path)
        self.fs = fs if fs is not None else FileOps()
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.sleep = sleep
        self._kind: str | None = None  # configfs provider value, once seen
        self._lock = real_lock()  # a real OS lock: providers run on pool threads
        self._extend_lock = real_lock()  # a real OS lock: providers run on pool threads

    # -- identity -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """`tdx` or `sev-snp`, from the kernel's `provider` attribute (probed once)."""
        kind = self._kind or self._probe()
        return KINDS[kind][0] if kind in KINDS else "configfs-tsm"

    @property
    def runtime_register(self) -> str:
        return "rtmr3" if self.name == "tdx" else "none"

    def _probe(self) -> str | None:
        with self._lock:
            if self._kind is not None:
                return self._kind
            entry = self._entry_name()
            try:
                self.fs.mkdir(entry)
            except OSError as e:
                log.warning("configfs-tsm: cannot create a report entry under %s: %s", self.root, _why(e))
                return None
            try:
                kind = self.fs.read(entry / "provider", MAX_SMALL).decode("ascii", "replace").strip()
            except OSError as e:
                log.warning("configfs-tsm: cannot read the provider attribute: %s", _why(e))
                return None
            finally:
                self._rmdir(entry)
            if kind in KINDS:
                self._kind = kind
            return kind

    def _entry_name(self) -> Path:
        return self.root / f"appliance-{os.getpid()}-{next(_counter)}-{secrets.token_hex(4)}"

    # -- evidence -------------------------------------------------------------------------------

    def evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report data must be exactly 64 bytes")
        last = "no attempt"
        for attempt in range(self.attempts):
            if attempt:
                self.sleep(self.backoff * (2 ** (attempt - 1)))
            try:
                return self._once(bytes(report_data))
            except _Retry as e:
                last = str(e)
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise ProviderError(f"configfs-tsm: {_why(e)} ({getattr(e, 'op', 'I/O')})") from None
                last = "the TSM is busy (EBUSY)"
            log.info("configfs-tsm: attempt %d failed, retrying: %s", attempt + 1, last)
        raise ProviderError(f"configfs-tsm: no report after {self.attempts} attempts: {last}")

    def _op(self, op: str, fn: Callable[..., _T], *args: object) -> _T:
        try:
            return fn(*args)
        except OSError as e:
            e.op = op  # type: ignore[attr-defined]
            raise

    def _generation(self, entry: Path) -> int:
        raw = self._op("read generation", self.fs.read, entry / "generation", MAX_SMALL)
        try:
            return int(raw.strip() or b"x")
        except ValueError:
            raise ProviderError(f"configfs-tsm: generation is not a number: {raw[:32]!r}") from None

    def _once(self, report_data: bytes) -> Evidence:
        entry = self._entry_name()
        self._op("mkdir", self.fs.mkdir, entry)
        try:
            n = self._op("write inblob", self.fs.write, entry / "inblob", report_data)
            if n != 64:
                raise ProviderError(f"configfs-tsm: short write to inblob ({n} of 64 bytes)")
            g1 = self._generation(entry)
            out = self._op("read outblob", self.fs.read, entry / "outblob", MAX_OUTBLOB)
            if len(out) > MAX_OUTBLOB:
                raise ProviderError(f"configfs-tsm: outblob larger than {MAX_OUTBLOB} bytes")
            raw_kind = self._op("read provider", self.fs.read, entry / "provider", MAX_SMALL)
            kind = raw_kind.decode("ascii", "replace").strip()
            try:
                aux = self._op("read auxblob", self.fs.read, entry / "auxblob", MAX_OUTBLOB)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    raise
                aux = b""
            if len(aux) > MAX_OUTBLOB:
                raise ProviderError(f"configfs-tsm: auxblob larger than {MAX_OUTBLOB} bytes")
            g2 = self._generation(entry)
        finally:
            self._rmdir(entry)
        if g2 != g1:
            raise _Retry(f"generation changed from {g1} to {g2}: another writer raced this request")
        if kind not in KINDS:
            raise ProviderError(f"configfs-tsm: unsupported TSM provider {kind!r}")
        provider, fmt, offset = KINDS[kind]
        if out[offset : offset + 64] != report_data:
            raise _Retry(f"the {provider} evidence does not carry this request's report data")
        self._kind = kind
        return Evidence(provider, fmt, out, aux or None)

    def _rmdir(self, entry: Path) -> None:
        for attempt in range(self.attempts):
            try:
                self.fs.rmdir(entry)
                return
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return
                if e.errno != errno.EBUSY or attempt == self.attempts - 1:
                    log.warning("configfs-tsm: cannot remove %s: %s", entry, _why(e))
                    return
            self.sleep(self.backoff)

    # -- runtime measurements -------------------------------------------------------------------

    def extend(self, event: MeasurementEvent) -> bool:
        """Extend RTMR3 with the event's 48-byte SHA-384 digest; False where there is no RTMR3."""
        if self.name != "tdx" or not self.fs.exists(self.rtmr_path):
            return False
        if event.register != "rtmr3" or event.algorithm != "sha384":
            raise ProviderError(f"configfs-tsm: can extend rtmr3 with sha384 only, not {event.register}/{event.algorithm}")
        try:
            digest = bytes.fromhex(event.digest)
        except (TypeError, ValueError):
            raise ProviderError("configfs-tsm: the event digest is not hex") from None
        if len(digest) != 48:
            raise ProviderError(f"configfs-tsm: an RTMR extend takes 48 bytes, not {len(digest)}")
        with self._extend_lock:
            try:
                n = self.fs.write(self.rtmr_path, digest)
            except OSError as e:
                raise ProviderError(f"configfs-tsm: extending rtmr3 failed: {_why(e)}") from None
        if n != 48:
            raise ProviderError(f"configfs-tsm: short write to rtmr3 ({n} of 48 bytes)")
        return True
