"""Model files as bytes: GGUF sanity checks, digests, and one sealed in-memory copy (no llama.cpp needed).

The disk is not trusted (README "Trust"). A file that is hashed and then memory-mapped can change
under the mapping: clean file pages are dropped under memory pressure and read again from the disk,
and the file can be swapped between hashing and loading. So a model is read once, hashed as it is read,
into anonymous memory sealed against writes (`read_sealed`), and llama.cpp loads that copy: the digest
that /status, the claims and the measurement log report is the digest of the bytes in use.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.engine.errors import LoadRefused

__all__ = ["GGUF_MAGIC", "SealedModel", "check_gguf", "read_sealed", "shmem_huge_pages"]

GGUF_MAGIC = b"GGUF"
_HEADER = 24  # magic, version, tensor count, KV count


def check_gguf(path: Path) -> None:
    """Refuse what is plainly not a GGUF file, before llama.cpp sees it."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER)
    except FileNotFoundError:
        raise LoadRefused("no such file") from None
    except IsADirectoryError:
        raise LoadRefused("is a directory, not a GGUF file") from None
    except OSError:
        raise LoadRefused("cannot be read") from None
    if len(head) < _HEADER or head[:4] != GGUF_MAGIC:
        raise LoadRefused("not a GGUF file (bad magic)")


_CHUNK = 1 << 22
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass
class SealedModel:
    """A model file's bytes as read once, in a memfd sealed against any change, and their digest.

    `path` (/proc/self/fd/N) opens that memory, never the file on disk. Close it once llama.cpp has
    loaded the model: llama.cpp's own mapping keeps the memory alive until it frees the model.
    """

    fd: int
    sha256: str
    size: int

    @property
    def path(self) -> Path:
        return Path(f"/proc/self/fd/{self.fd}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_sealed(path: Path, *, after_read: Callable[[Path], None] | None = None) -> SealedModel:
    """Read `path` once into sealed anonymous memory, hashing every byte on the way.

    `after_read` runs once the bytes are in memory, before they are sealed and used: a test hook for a
    file swapped between reading and loading (nothing reads the file again, so nothing can see it).
    """
    fd = os.memfd_create(f"model:{path.name}"[:200], os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        h = hashlib.sha256()
        size = 0
        with open(path, "rb") as f:
            buf = bytearray(_CHUNK)
            view = memoryview(buf)
            while n := f.readinto(buf):
                chunk = view[:n]
                h.update(chunk)
                while chunk:
                    chunk = chunk[os.write(fd, chunk) :]
                size += n
        if after_read is not None:
            after_read(path)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        return SealedModel(fd, h.hexdigest(), size)
    except BaseException:
        os.close(fd)
        raise


_SHMEM_THP = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")


def shmem_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode for shared memory, which a sealed copy is made of
    ("never", "within_size", "advise", "always", ...), or None where the kernel does not say.

    With "never" (a common default) the copy is in 4 KiB pages, and weights llama.cpp maps from it
    rather than repacks decode slower: measured here on the bench's Q8_0 model, single stream against
    llama-server, 0.92x with "never" and 1.015x with "within_size" (5 alternating pairs each)."""
    try:
        text = _SHMEM_THP.read_text()
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None
