"""Attested TLS: a TLS key and self-signed certificate made in memory at boot.

The key never touches a disk: it lives in a memfd (anonymous memory with a file descriptor), which
gunicorn reads through /proc/self/fd/N, inherited by the worker across the fork. The SHA-256 of the
certificate's SubjectPublicKeyInfo goes into the attestation claims, so a client that verified the
attestation pins the TLS key instead of trusting any CA.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = ["AttestedTls", "make_attested_tls"]


@dataclass(frozen=True)
class AttestedTls:
    certfile: str
    keyfile: str
    spki_sha256: str

    def __repr__(self) -> str:  # never the key material or where it lives
        return f"AttestedTls(spki_sha256={self.spki_sha256!r})"


def _memfd(name: str, data: bytes) -> str:
    fd = os.memfd_create(name, 0)  # inherited by the forked worker: no close-on-exec needed, no exec
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return f"/proc/self/fd/{fd}"


def make_attested_tls(host: str, *, now: datetime.datetime | None = None, days: int = 365) -> AttestedTls:
    key = ec.generate_private_key(ec.SECP256R1())
    now = now or datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
    except ValueError:
        if host:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance (attested)")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return AttestedTls(
        certfile=_memfd("appliance-tls-cert", cert.public_bytes(serialization.Encoding.PEM)),
        keyfile=_memfd("appliance-tls-key", key_pem),
        spki_sha256=hashlib.sha256(spki).hexdigest(),
    )
