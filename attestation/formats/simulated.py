"""`simulated-v1`: evidence from a machine without a TEE. It proves nothing, and says so."""

from __future__ import annotations

import hmac
import json

from ..policy import Policy
from . import FormatResult, register

__all__ = ["SimulatedFormat"]


class SimulatedFormat:
    format = "simulated-v1"

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult:
        result = FormatResult(provider="simulated")
        try:
            doc = json.loads(evidence)
        except ValueError:
            result.add("evidence", "fail", "simulated evidence is not JSON")
            return result
        if not isinstance(doc, dict) or doc.get("simulated") is not True or doc.get("format") != self.format:
            result.add("evidence", "fail", "not simulated-v1 evidence")
            return result
        rd = doc.get("report_data")
        ok = isinstance(rd, str) and hmac.compare_digest(rd, report_data.hex())
        result.add("report-data", "pass" if ok else "fail", "binds these claims" if ok else "does not match the claims")
        result.add("evidence-signature", "skip", "simulated evidence is not signed by any hardware")
        return result


register(SimulatedFormat())
