"""Pinned vendor root certificates, and the extra roots a policy may add (tests, private PKIs).

A root is trusted by the SHA-256 fingerprint of its DER encoding, nothing else: a chain whose last
certificate is not one of these exact certificates fails, whatever its subject says. Each vendor has
a name ("intel", "amd", "aws"); `PINNED` maps it to the fingerprints and `ROOT_PEMS` to the PEM
texts, which must hash to those fingerprints (tests/unit/test_tdx_sgx.py checks it).

`policy.roots[vendor]` may name extra root certificates: a PEM path, or a list of PEM paths (each
file may hold several certificates). They are for test chains and private deployments only.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

__all__ = [
    "INTEL_SGX_ROOT_CA_PEM",
    "INTEL_SGX_ROOT_CA_SHA256",
    "PINNED",
    "ROOT_PEMS",
    "RootsError",
    "fingerprint",
    "pinned_roots",
    "extra_roots",
    "trusted_roots",
]


class RootsError(ValueError):
    """An extra root named by the policy cannot be read or parsed."""


# Intel SGX Root CA (CN=Intel SGX Root CA, O=Intel Corporation, L=Santa Clara, ST=CA, C=US; valid
# 2018-05-21 10:45:10 to 2049-12-31 23:59:59 UTC; ECDSA P-256, self-signed). It anchors every PCK
# certificate chain of SGX and TDX DCAP quotes. Copied from google/go-tdx-guest
# verify/trusted_root.pem (commit 94908f59660eaacb11d2a746474fc73b10458327); the same bytes ship in
# edgelesssys/go-tdx-qpl (verification/pcs) and Phala-Network/dcap-qvl sample quotes, and Intel
# publishes the DER at https://certificates.trustedservices.intel.com/IntelSGXRootCA.der.
INTEL_SGX_ROOT_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIICjzCCAjSgAwIBAgIUImUM1lqdNInzg7SVUr9QGzknBqwwCgYIKoZIzj0EAwIw
aDEaMBgGA1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENv
cnBvcmF0aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJ
BgNVBAYTAlVTMB4XDTE4MDUyMTEwNDUxMFoXDTQ5MTIzMTIzNTk1OVowaDEaMBgG
A1UEAwwRSW50ZWwgU0dYIFJvb3QgQ0ExGjAYBgNVBAoMEUludGVsIENvcnBvcmF0
aW9uMRQwEgYDVQQHDAtTYW50YSBDbGFyYTELMAkGA1UECAwCQ0ExCzAJBgNVBAYT
AlVTMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEC6nEwMDIYZOj/iPWsCzaEKi7
1OiOSLRFhWGjbnBVJfVnkY4u3IjkDYYL0MxO4mqsyYjlBalTVYxFP2sJBK5zlKOB
uzCBuDAfBgNVHSMEGDAWgBQiZQzWWp00ifODtJVSv1AbOScGrDBSBgNVHR8ESzBJ
MEegRaBDhkFodHRwczovL2NlcnRpZmljYXRlcy50cnVzdGVkc2VydmljZXMuaW50
ZWwuY29tL0ludGVsU0dYUm9vdENBLmRlcjAdBgNVHQ4EFgQUImUM1lqdNInzg7SV
Ur9QGzknBqwwDgYDVR0PAQH/BAQDAgEGMBIGA1UdEwEB/wQIMAYBAf8CAQEwCgYI
KoZIzj0EAwIDSQAwRgIhAOW/5QkR+S9CiSDcNoowLuPRLsWGf/Yi7GSX94BgwTwg
AiEA4J0lrHoMs+Xo5o/sX6O9QWxHRAvZUGOdRQ7cvqRXaqI=
-----END CERTIFICATE-----
"""
INTEL_SGX_ROOT_CA_SHA256 = "44a0196b2b99f889b8e149e95b807a350e7424964399e885a7cbb8ccfab674d3"

# vendor -> SHA-256 fingerprints (lowercase hex) of the DER of each pinned root.
PINNED: dict[str, tuple[str, ...]] = {
    "intel": (INTEL_SGX_ROOT_CA_SHA256,),
}

# vendor -> PEM texts of the pinned roots (each must hash to a fingerprint in PINNED).
ROOT_PEMS: dict[str, tuple[str, ...]] = {
    "intel": (INTEL_SGX_ROOT_CA_PEM,),
}


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER encoding, lowercase hex."""
    return hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()


def pinned_roots(vendor: str) -> list[x509.Certificate]:
    """The built-in roots of `vendor` whose DER matches a pinned fingerprint."""
    pins = set(PINNED.get(vendor, ()))
    out = []
    for pem in ROOT_PEMS.get(vendor, ()):
        cert = x509.load_pem_x509_certificate(pem.encode())
        if fingerprint(cert) in pins:
            out.append(cert)
    return out


def extra_roots(policy, vendor: str) -> list[x509.Certificate]:
    """Roots named by `policy.roots[vendor]` (a PEM path or a list of them); RootsError if unreadable."""
    roots = getattr(policy, "roots", None) or {}
    spec = roots.get(vendor)
    if spec is None:
        return []
    paths = [spec] if isinstance(spec, (str, Path)) else spec
    if not isinstance(paths, (list, tuple)) or not all(isinstance(p, (str, Path)) for p in paths):
        raise RootsError(f"policy roots.{vendor} must be a PEM path or a list of PEM paths")
    out: list[x509.Certificate] = []
    for p in paths:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise RootsError(f"policy roots.{vendor}: cannot read {p}: {e.strerror}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except (ValueError, x509.InvalidVersion):
            raise RootsError(f"policy roots.{vendor}: {p} holds no PEM certificate") from None
        out.extend(certs)
    return out


def trusted_roots(policy, vendor: str) -> dict[str, x509.Certificate]:
    """Pinned plus policy-supplied roots of `vendor`, keyed by DER SHA-256 fingerprint."""
    out = {fingerprint(c): c for c in pinned_roots(vendor)}
    for c in extra_roots(policy, vendor):
        out[fingerprint(c)] = c
    return out
