"""AWS Nitro Enclaves: evidence and runtime measurements through the Nitro Secure Module (/dev/nsm).

The NSM speaks CBOR over one ioctl (Linux uapi <linux/nsm.h>; aws-nitro-enclaves-nsm-api):

    struct nsm_iovec { __u64 addr; __u64 len; };
    struct nsm_raw   { struct nsm_iovec request; struct nsm_iovec response; };   /* 32 bytes */
    NSM_IOCTL_RAW = _IOWR(0x0A, 0, struct nsm_raw) = 0xC0200A00
    request <= 0x1000 bytes; response buffer 0x3000 bytes, its len rewritten to the answer's length

    {"Attestation": {"user_data": 64 bytes, "nonce": nil, "public_key": nil}}
        -> {"Attestation": {"document": COSE_Sign1 bytes}}
    {"ExtendPCR": {"index": 16, "data": 48 bytes}} -> {"ExtendPCR": {"data": new PCR value}}
    {"LockPCR": {"index": 16}} -> "LockPCR"
    {"DescribePCR": {"index": 16}} -> {"DescribePCR": {"lock": bool, "data": bytes}}
    errors: {"Error": "InvalidArgument" | "InvalidIndex" | "ReadOnlyIndex" | ...}

Report data goes in `user_data` (the verifier's binding). Model digests are extended into PCR16
(PCR' = SHA-384(PCR || data), the rule attestation.measurements replays). A document lists only
*locked* PCRs, so PCR16 reaches the verifier only after `seal()` locks it; after that no further
extension is possible until the enclave restarts. `seal_on_evidence=True` seals at the first
attestation.

The transport is injectable (`transport(request_bytes) -> response_bytes`) so tests drive the real
CBOR protocol against a fake NSM; the default transport does the ioctl above.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from appliance.evidence import Evidence, MeasurementEvent, ProviderError
from appliance.osthreads import Lock, real_lock

try:
    import cbor2
except ImportError:  # pragma: no cover
    _HAVE_CBOR2 = False
else:
    _HAVE_CBOR2 = True

__all__ = ["NitroProvider", "NsmDevice", "NSM_IOCTL_RAW", "NSM_REQUEST_MAX_SIZE", "NSM_RESPONSE_MAX_SIZE", "RUNTIME_PCR"]

log = logging.getLogger("appliance.tee.nitro")

NSM_MAGIC = 0x0A
NSM_REQUEST_MAX_SIZE = 0x1000
NSM_RESPONSE_MAX_SIZE = 0x3000
RUNTIME_PCR = 16


class _Iovec(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _NsmRaw(ctypes.Structure):
    _fields_ = [("request", _Iovec), ("response", _Iovec)]


def _iowr(magic: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir (2 bits, READ|WRITE = 3) << 30 | size (14 bits) << 16 | type << 8 | nr
    return (3 << 30) | (size << 16) | (magic << 8) | nr


NSM_IOCTL_RAW = _iowr(NSM_MAGIC, 0, ctypes.sizeof(_NsmRaw))  # 0xC0200A00


def _os_lock() -> Lock:
    """A real OS lock even under gevent's monkey patching: providers run on pool threads."""
    return real_lock()


class NsmDevice:
    """The default transport: one NSM_IOCTL_RAW round trip per request on `path`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def __call__(self, request: bytes) -> bytes:
        if len(request) > NSM_REQUEST_MAX_SIZE:
            raise ProviderError(f"NSM request of {len(request)} bytes exceeds {NSM_REQUEST_MAX_SIZE}")
        req_buf = ctypes.create_string_buffer(request, len(request))
        resp_buf = ctypes.create_string_buffer(NSM_RESPONSE_MAX_SIZE)
        msg = _NsmRaw(
            _Iovec(ctypes.addressof(req_buf), len(request)),
            _Iovec(ctypes.addressof(resp_buf), NSM_RESPONSE_MAX_SIZE),
        )
        try:
            fd = os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise ProviderError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            fcntl.ioctl(fd, NSM_IOCTL_RAW, msg, True)
        except OSError as e:
            code = errno.errorcode.get(e.errno, e.errno) if e.errno is not None else None
            raise ProviderError(f"NSM ioctl failed: {code} {e.strerror or ''}".rstrip()) from None
        finally:
            os.close(fd)
        n = msg.response.len
        if not 0 < n <= NSM_RESPONSE_MAX_SIZE:
            raise ProviderError(f"NSM answered with an impossible length {n}")
        return resp_buf.raw[:n]


class NitroProvider:
    """Evidence from the NSM; runtime measurements into PCR16."""

    name = "nitro"
    runtime_register = "pcr16"

    def __init__(
        self,
        device_path: Path | str = "/dev/nsm",
        transport: Callable[[bytes], bytes] | None = None,
        *,
        seal_on_evidence: bool = False,
    ) -> None:
        if not _HAVE_CBOR2:
            raise ProviderError("the cbor2 package is required for the Nitro provider")
        self.device_path = Path(device_path)
        self._transport = transport if transport is not None else NsmDevice(self.device_path)
        self._lock = _os_lock()
        self._seal_on_evidence = seal_on_evidence

    def _call(self, request: Mapping[str, object], op: str) -> object:
        """One request/answer, decoded; NSM errors and malformed answers raise ProviderError."""
        raw = self._transport(cbor2.dumps(request))
        try:
            answer = cbor2.loads(raw)
        except Exception as e:  # any decoding failure is the device's fault, reported as such
            raise ProviderError(f"NSM {op}: answer is not CBOR ({e.__class__.__name__})") from None
        if isinstance(answer, Mapping) and "Error" in answer:
            raise ProviderError(f"NSM {op} failed: {answer['Error']}")
        return answer

    def _field(self, answer: object, op: str, key: str) -> bytes:
        body = answer.get(op) if isinstance(answer, Mapping) else None
        value = body.get(key) if isinstance(body, Mapping) else None
        if not isinstance(value, bytes):
            raise ProviderError(f"NSM {op}: answer has no {key}")
        return value

    def evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, bytes) or len(report_data) != 64:
            raise ProviderError("report data must be exactly 64 bytes")
        with self._lock:
            if self._seal_on_evidence:
                self._seal_locked()
            answer = self._call({"Attestation": {"user_data": report_data, "nonce": None, "public_key": None}}, "Attestation")
        doc = self._field(answer, "Attestation", "document")
        return Evidence(provider="nitro", format="nitro-cose-sign1", data=doc)

    def extend(self, event: MeasurementEvent) -> bool:
        if event.register != self.runtime_register or event.algorithm != "sha384":
            raise ProviderError(
                f"Nitro extends sha384 digests into {self.runtime_register}, not {event.algorithm} into {event.register}"
            )
        try:
            data = bytes.fromhex(event.digest)
        except ValueError:
            raise ProviderError("measurement digest is not hex") from None
        if len(data) != 48:
            raise ProviderError("measurement digest must be 48 bytes (SHA-384)")
        with self._lock:
            answer = self._call({"ExtendPCR": {"index": RUNTIME_PCR, "data": data}}, "ExtendPCR")
        if len(self._field(answer, "ExtendPCR", "data")) != 48:
            raise ProviderError("NSM ExtendPCR: new PCR value is not 48 bytes")
        return True

    def describe(self, index: int = RUNTIME_PCR) -> tuple[bool, bytes]:
        """(locked, value) of a PCR."""
        with self._lock:
            answer = self._call({"DescribePCR": {"index": index}}, "DescribePCR")
        body = answer.get("DescribePCR") if isinstance(answer, Mapping) else None
        if not isinstance(body, Mapping) or not isinstance(body.get("lock"), bool):
            raise ProviderError("NSM DescribePCR: malformed answer")
        return body["lock"], self._field(answer, "DescribePCR", "data")

    def seal(self) -> bool:
        """Lock PCR16 so documents include it; afterwards extend() fails. True if this call locked it."""
        with self._lock:
            return self._seal_locked()

    def _seal_locked(self) -> bool:
        answer = self._call({"DescribePCR": {"index": RUNTIME_PCR}}, "DescribePCR")
        body = answer.get("DescribePCR") if isinstance(answer, Mapping) else None
        if isinstance(body, Mapping) and body.get("lock") is True:
            return False
        self._call({"LockPCR": {"index": RUNTIME_PCR}}, "LockPCR")
        log.info("PCR%d locked: the runtime measurement log is sealed", RUNTIME_PCR)
        return True
