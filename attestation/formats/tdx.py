"""`tdx-quote-v4`: an Intel TDX quote (version 4, ECDSA P-256), as configfs-tsm returns it.

TD report body (584 bytes at 0x30), offsets inside the body:

    0x000 TEE_TCB_SVN (16)   0x010 MRSEAM (48)       0x040 MRSIGNERSEAM (48)  0x070 SEAMATTRIBUTES (8)
    0x078 TDATTRIBUTES (8, bit 0 = DEBUG)            0x080 XFAM (8)           0x088 MRTD (48)
    0x0b8 MRCONFIGID (48)    0x0e8 MROWNER (48)      0x118 MROWNERCONFIG (48)
    0x148 RTMR0..RTMR3 (4 x 48)                      0x208 REPORTDATA (64; absolute 0x238..0x278)

Measurements reported (lowercase hex): mrtd, rtmr0..rtmr3, mrseam, mrsignerseam, mrconfigid,
mrowner, mrownerconfig, and qe_mrsigner (the MRSIGNER of the quoting enclave's report); a policy's
[tdx] table may pin any of them. RTMR3 is the runtime register the appliance extends at model load.
"""

from __future__ import annotations

from ..policy import Policy
from . import FormatResult, expect_measurements, register
from ._intel import (
    HEADER_LEN,
    SGX_MRSIGNER,
    TDX_REPORT_LEN,
    TEE_TYPE_TDX,
    QuoteError,
    check_debug,
    check_report_data,
    check_signatures,
    parse_quote,
    tcb_skipped,
)

__all__ = ["TdxQuoteV4", "BODY", "REPORT_DATA_OFFSET"]

BODY = {
    "mrseam": (0x10, 48),
    "mrsignerseam": (0x40, 48),
    "mrtd": (0x88, 48),
    "mrconfigid": (0xB8, 48),
    "mrowner": (0xE8, 48),
    "mrownerconfig": (0x118, 48),
    "rtmr0": (0x148, 48),
    "rtmr1": (0x178, 48),
    "rtmr2": (0x1A8, 48),
    "rtmr3": (0x1D8, 48),
}
TD_ATTRIBUTES = 0x78
REPORT_DATA = 0x208
REPORT_DATA_OFFSET = HEADER_LEN + REPORT_DATA  # 0x238, absolute


class TdxQuoteV4:
    format = "tdx-quote-v4"
    provider = "tdx"

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult:
        result = FormatResult(provider=self.provider)
        try:
            quote = parse_quote(evidence, version=4, tee_type=TEE_TYPE_TDX, body_len=TDX_REPORT_LEN)
        except QuoteError as e:
            result.add("evidence-format", "fail", str(e))
            return result
        pad = f", {quote.padding} bytes of zero padding" if quote.padding else ""
        result.add("evidence-format", "pass", f"TDX quote v4, {len(evidence)} bytes{pad}")
        body = quote.body
        result.measurements = {name: body[off : off + n].hex() for name, (off, n) in BODY.items()}
        result.measurements["qe_mrsigner"] = quote.qe_report[SGX_MRSIGNER : SGX_MRSIGNER + 32].hex()
        result.runtime_register = body[BODY["rtmr3"][0] : BODY["rtmr3"][0] + 48]

        check_signatures(result, quote, policy=policy, now=now)
        check_report_data(result, body[REPORT_DATA : REPORT_DATA + 64], report_data)
        check_debug(result, bool(body[TD_ATTRIBUTES] & 0x01), what="TD", policy=policy)
        expect_measurements(result, getattr(policy, "tdx", None) or {}, "TDX")
        tcb_skipped(result)
        return result


register(TdxQuoteV4())
