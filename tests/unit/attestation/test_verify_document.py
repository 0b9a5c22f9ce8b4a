"""verify_attestation on malformed documents: every one is refused with AttestationFailed, never
another exception (a client's `except AttestationFailed` must be enough)."""

from __future__ import annotations

import base64

import pytest

from attestation.policy import Policy
from attestation.verify import AttestationFailed, verify_attestation

NONCE = "ab" * 32


def _doc(**fields: object) -> dict[str, object]:
    b64 = base64.b64encode
    return {"version": 1, "claims_b64": b64(b"{}").decode(), "evidence_b64": b64(b"x").decode(), **fields}


@pytest.mark.parametrize("fmt", [["tdx"], {"tdx": 1}, 7, None, "no-such-format"])
def test_a_format_that_is_not_a_known_name_fails_the_factor(fmt):
    with pytest.raises(AttestationFailed) as e:
        verify_attestation(_doc(format=fmt), nonce=NONCE, policy=Policy(allow_simulated=True))
    assert [f.name for f in e.value.report.failures()] == ["evidence-format"]
