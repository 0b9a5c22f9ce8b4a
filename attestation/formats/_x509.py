"""Certificate-chain links shared by the SEV-SNP and Nitro verifiers."""

from __future__ import annotations

from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

__all__ = ["link_problem"]


def link_problem(child: x509.Certificate, issuer: x509.Certificate, when: datetime, *, ca: bool = True) -> str | None:
    """Why `issuer` did not issue a valid `child` at `when`, or None when it did."""
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        return f"{child.subject.rfc4514_string()} is not signed by {issuer.subject.rfc4514_string()} ({e.__class__.__name__})"
    if ca:
        try:
            bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            return f"{issuer.subject.rfc4514_string()} is not a CA certificate"
    for c in (child, issuer):
        if not (c.not_valid_before_utc <= when <= c.not_valid_after_utc):
            return f"{c.subject.rfc4514_string()} is not valid at {when.isoformat()}"
    return None
