"""`sgx-quote-v3`: an Intel SGX DCAP quote (version 3, ECDSA P-256), as Gramine's
`/dev/attestation/quote` returns it.

ISV enclave report body (384 bytes at 0x30), offsets inside the body:

    0   CPUSVN (16)       16  MISCSELECT (4)     32  ISVEXTPRODID (16)
    48  ATTRIBUTES (16: flags u64 LE, bit 1 = DEBUG; then XFRM)
    64  MRENCLAVE (32)    128 MRSIGNER (32)      192 CONFIGID (64)
    256 ISVPRODID (u16)   258 ISVSVN (u16)       260 CONFIGSVN (u16)   304 ISVFAMILYID (16)
    320 REPORTDATA (64; absolute 0x170..0x1b0)

Measurements reported: mrenclave, mrsigner (lowercase hex), isvprodid and isvsvn (decimal strings),
qe_mrsigner; a policy's [sgx] table may pin any of them (as strings). SGX has no runtime register.
"""

from __future__ import annotations

from ..policy import Policy
from . import FormatResult, expect_measurements, register
from ._intel import (
    HEADER_LEN,
    SGX_ATTRIBUTES,
    SGX_ISVPRODID,
    SGX_ISVSVN,
    SGX_MRENCLAVE,
    SGX_MRSIGNER,
    SGX_REPORT_LEN,
    SGX_REPORTDATA,
    TEE_TYPE_SGX,
    QuoteError,
    check_debug,
    check_report_data,
    check_signatures,
    parse_quote,
    tcb_skipped,
)

__all__ = ["SgxQuoteV3", "REPORT_DATA_OFFSET"]

REPORT_DATA_OFFSET = HEADER_LEN + SGX_REPORTDATA  # 0x170, absolute
SGX_FLAGS_DEBUG = 0x02


class SgxQuoteV3:
    format = "sgx-quote-v3"
    provider = "gramine-sgx"

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult:
        result = FormatResult(provider=self.provider)
        try:
            quote = parse_quote(evidence, version=3, tee_type=TEE_TYPE_SGX, body_len=SGX_REPORT_LEN)
        except QuoteError as e:
            result.add("evidence-format", "fail", str(e))
            return result
        pad = f", {quote.padding} bytes of zero padding" if quote.padding else ""
        result.add("evidence-format", "pass", f"SGX quote v3, {len(evidence)} bytes{pad}")
        body = quote.body
        result.measurements = {
            "mrenclave": body[SGX_MRENCLAVE : SGX_MRENCLAVE + 32].hex(),
            "mrsigner": body[SGX_MRSIGNER : SGX_MRSIGNER + 32].hex(),
            "isvprodid": str(int.from_bytes(body[SGX_ISVPRODID : SGX_ISVPRODID + 2], "little")),
            "isvsvn": str(int.from_bytes(body[SGX_ISVSVN : SGX_ISVSVN + 2], "little")),
            "qe_mrsigner": quote.qe_report[SGX_MRSIGNER : SGX_MRSIGNER + 32].hex(),
        }

        check_signatures(result, quote, policy=policy, now=now)
        check_report_data(result, body[SGX_REPORTDATA : SGX_REPORTDATA + 64], report_data)
        check_debug(result, bool(body[SGX_ATTRIBUTES] & SGX_FLAGS_DEBUG), what="enclave", policy=policy)
        expect_measurements(result, getattr(policy, "sgx", None) or {}, "SGX")
        tcb_skipped(result)
        return result


register(SgxQuoteV3())
