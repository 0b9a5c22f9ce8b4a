"""Gramine SGX: DCAP quotes through Gramine's /dev/attestation pseudo-files.

    write exactly 64 bytes to ROOT/user_report_data
    read ROOT/quote                         (an SGX quote v3 over a report with that report data)

The two files are per-process state inside the enclave, so one lock serializes write-then-read.
When ROOT/attestation_type exists it must say `dcap` (`none`: remote attestation is off in the
manifest; `epid`: EPID quotes, which this appliance's verifier does not accept). The quote must
carry our report data at 0x170, or it answers another request. SGX has no runtime measurement
register: `extend()` returns False and the event is only logged.
"""

from __future__ import annotations

from pathlib import Path

from appliance.evidence import Evidence, MeasurementEvent, ProviderError
from appliance.evidence.configfs import FileOps
from appliance.osthreads import real_lock

__all__ = ["GramineProvider", "MAX_QUOTE"]

MAX_QUOTE = 64 * 1024
REPORT_DATA_OFFSET = 0x170  # 48-byte header + 320 into the ISV enclave report body


class GramineProvider:
    name = "gramine-sgx"
    runtime_register = "none"

    def __init__(self, root: Path | str = Path("/dev/attestation"), *, fs: FileOps | None = None) -> None:
        self.root = Path(root)
        self.fs = fs if fs is not None else FileOps()
        self._lock = real_lock()  # a real OS lock: providers run on pool threads

    def evidence(self, report_data: bytes) -> Evidence:
        if not isinstance(report_data, (bytes, bytearray)) or len(report_data) != 64:
            raise ProviderError("report data must be exactly 64 bytes")
        report_data = bytes(report_data)
        with self._lock:
            kind_path = self.root / "attestation_type"
            if self.fs.exists(kind_path):
                try:
                    kind = self.fs.read(kind_path, 64).decode("ascii", "replace").strip().rstrip("\x00")
                except OSError as e:
                    raise ProviderError(f"gramine: cannot read attestation_type: {e.strerror or e}") from None
                if kind != "dcap":
                    raise ProviderError(f"gramine: attestation type is {kind!r}; DCAP (sgx.remote_attestation = \"dcap\") is required")
            try:
                n = self.fs.write(self.root / "user_report_data", report_data)
            except OSError as e:
                raise ProviderError(f"gramine: writing user_report_data failed: {e.strerror or e}") from None
            if n != 64:
                raise ProviderError(f"gramine: short write to user_report_data ({n} of 64 bytes)")
            try:
                quote = self.fs.read(self.root / "quote", MAX_QUOTE)
            except OSError as e:
                raise ProviderError(f"gramine: reading the quote failed: {e.strerror or e}") from None
        if len(quote) > MAX_QUOTE:
            raise ProviderError(f"gramine: quote larger than {MAX_QUOTE} bytes")
        if quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + 64] != report_data:
            raise ProviderError("gramine: the quote does not carry this request's report data")
        return Evidence(self.name, "sgx-quote-v3", quote)

    def extend(self, event: MeasurementEvent) -> bool:
        return False
