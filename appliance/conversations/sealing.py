"""Records sealed at rest: AES-256-GCM under a key that exists only in this process's memory.

Where the key comes from, first match wins (`boot_key`):
1. a TEE sealing secret, when the evidence provider offers one (`sealing_secret()`: SEV-SNP's
   MSG_KEY_REQ derived key, SGX's EGETKEY seal key, a Nitro enclave's KMS-released secret). It is the
   same for the same measured code on the same platform, so records survive a full restart there.
   No provider implements it yet: this is the hook, and `TeeSealingSource` its protocol.
2. the boot identity: HKDF over the identity key's Ed25519 signature of a fixed, domain-separated
   label. The identity key is made from fresh random bytes in the gunicorn master before it forks
   (trust/identity.py) and every worker inherits it, so a worker restart derives the same sealing
   key, while a copy of the disk gets nothing (neither key is ever written). Ed25519 signing is
   deterministic (RFC 8032), and nothing else signs this label. A full process restart makes a new
   identity and so a new sealing key: records sealed before it can no longer be opened (by design).
`SealingKey.generate()` (HKDF over fresh random bytes, the randomness injectable) is for tests and for
callers that hold the key themselves.

A sealed record is `header || nonce (12) || ciphertext+tag`. The header (magic, key id, kind, time
written) travels in clear and, with the record's id and owner, is the associated data: a record
renamed, re-dated, given to another owner or moved between kinds does not open. Nonces are random
(96 bits): far below the 2^32 seals per key that random GCM nonces allow.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["SealingKey", "Unsealable", "Signer", "TeeSealingSource", "Kind", "Header", "boot_key", "read_header", "HEADER_SIZE"]

Kind = Literal["response", "conversation"]

_MAGIC = b"APSEAL1\n"
_KINDS: dict[str, bytes] = {"response": b"r", "conversation": b"c"}
_HEADER = struct.Struct(">8s8scQ")  # magic, key id, kind, written at (ms since the epoch)
HEADER_SIZE = _HEADER.size
_NONCE = 12
_KEY_INFO = b"appliance conversations sealing key v1"
_KEY_ID_INFO = b"appliance conversations key id v1"
_IDENTITY_LABEL = b"appliance-conversations-sealing-key-v1\x00derive"


class Unsealable(Exception):
    """A record that does not open: another key, another owner, another id, or tampered. One error
    for all of them, on purpose."""


class Signer(Protocol):
    """What the boot identity offers (trust/identity.py `Identity.sign_bytes`)."""

    def sign_bytes(self, data: bytes) -> bytes: ...


@runtime_checkable
class TeeSealingSource(Protocol):
    """An evidence provider that can give a sealing secret bound to the measured code (the hook)."""

    def sealing_secret(self) -> bytes: ...


@dataclass(frozen=True)
class Header:
    """A sealed record's clear header, as parsed (not yet authenticated: that happens on open)."""

    key_id: bytes
    kind: Kind
    written_at: float


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def _field(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">I", len(data)) + data


class SealingKey:
    """Seals and opens records; the key never leaves this object (no repr, no accessor)."""

    def __init__(
        self, secret: bytes, *, source: str, random_bytes: Callable[[int], bytes] = os.urandom
    ) -> None:
        if len(secret) < 16:
            raise ValueError("a sealing secret has at least 16 bytes")
        key = _hkdf(secret, _KEY_INFO + b"\x00" + source.encode())
        self._aead = AESGCM(key)
        self.key_id = _hkdf(key, _KEY_ID_INFO)[:8]
        """Names the key, not a secret: tells a record sealed under another key without trying it."""
        self.source = source
        self._random = random_bytes

    def __repr__(self) -> str:
        return f"SealingKey(source={self.source!r})"

    @classmethod
    def generate(cls, random_bytes: Callable[[int], bytes] = os.urandom) -> SealingKey:
        return cls(random_bytes(32), source="random", random_bytes=random_bytes)

    @classmethod
    def for_identity(cls, identity: Signer) -> SealingKey:
        return cls(identity.sign_bytes(_IDENTITY_LABEL), source="identity")

    def seal(self, kind: Kind, record_id: str, owner: str, plaintext: bytes, *, written_at: float) -> bytes:
        header = _HEADER.pack(_MAGIC, self.key_id, _KINDS[kind], max(0, int(written_at * 1000)))
        nonce = self._random(_NONCE)
        return header + nonce + self._aead.encrypt(nonce, plaintext, _associated(header, record_id, owner))

    def open(self, kind: Kind, record_id: str, owner: str, sealed: bytes) -> bytes:
        header = read_header(sealed)
        if header is None or header.kind != kind or header.key_id != self.key_id:
            raise Unsealable()
        raw = sealed[:HEADER_SIZE]
        nonce = sealed[HEADER_SIZE : HEADER_SIZE + _NONCE]
        try:
            return self._aead.decrypt(nonce, sealed[HEADER_SIZE + _NONCE :], _associated(raw, record_id, owner))
        except InvalidTag:
            raise Unsealable() from None


def _associated(header: bytes, record_id: str, owner: str) -> bytes:
    return header + _field(record_id) + _field(owner)


def read_header(sealed: bytes) -> Header | None:
    """The clear header of a sealed record, or None if it is not one (too short, another format)."""
    if len(sealed) < HEADER_SIZE + _NONCE + 16:
        return None
    magic, key_id, kind, written_ms = _HEADER.unpack_from(sealed, 0)
    names = {v: k for k, v in _KINDS.items()}
    if magic != _MAGIC or kind not in names:
        return None
    found: Kind = "response" if names[kind] == "response" else "conversation"
    return Header(key_id, found, written_ms / 1000.0)


def boot_key(identity: Signer, provider: object = None) -> SealingKey:
    """The store's key for this boot: the TEE's sealing secret where the evidence `provider` offers one
    (`TeeSealingSource`), else derived from the boot identity (module docstring)."""
    if isinstance(provider, TeeSealingSource):
        return SealingKey(provider.sealing_secret(), source="tee")
    return SealingKey.for_identity(identity)
