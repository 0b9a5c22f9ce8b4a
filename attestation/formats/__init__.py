"""Evidence formats: each handler parses one format's exact bytes and checks what it can offline.

A handler returns factors (pass/fail/skip) for: the hardware signature and certificate chain up to
a pinned vendor root, the report data (it must equal the expected 64 bytes), debug mode, expected
measurements from the policy, and what needs online collateral (TCB status: skip). Handlers never
raise for bad evidence: a truncated, oversized or forged document is a failed factor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..policy import Policy

__all__ = ["Factor", "FormatResult", "FormatHandler", "FORMATS", "register"]


@dataclass(frozen=True)
class Factor:
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str


@dataclass
class FormatResult:
    provider: str
    factors: list[Factor] = field(default_factory=list)
    measurements: dict[str, str] = field(default_factory=dict)
    """Hex measurement registers as the evidence reports them (mrtd, rtmr0.., measurement, pcr0..)."""
    runtime_register: bytes | None = None
    """The register runtime measurements are extended into (TDX RTMR3, Nitro PCR16), if any."""

    def add(self, name: str, status: str, detail: str) -> None:
        self.factors.append(Factor(name, status, detail))


class FormatHandler(Protocol):
    format: str

    def check(
        self, evidence: bytes, aux: bytes | None, *, report_data: bytes, policy: Policy, now: float
    ) -> FormatResult: ...


FORMATS: dict[str, FormatHandler] = {}


def register(handler: FormatHandler) -> FormatHandler:
    FORMATS[handler.format] = handler
    return handler


def expect_measurements(result: FormatResult, expected: dict[str, Any], what: str) -> None:
    """Compare the policy's expected registers with the evidence's; skip when the policy sets none."""
    if not expected:
        result.add("measurements", "skip", f"no expected {what} measurements in the policy")
        return
    wrong = [k for k, v in expected.items() if result.measurements.get(k) != v]
    if wrong:
        result.add("measurements", "fail", f"{', '.join(sorted(wrong))} differ from the policy")
    else:
        result.add("measurements", "pass", f"{', '.join(sorted(expected))} as expected")


from . import (  # noqa: E402,F401  (Intel TDX and SGX quotes register themselves)  # noqa
    nitro,
    sgx,
    simulated,
    snp,
    tdx,
)
