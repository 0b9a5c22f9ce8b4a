"""The one file-digest helper: SHA-256 of a file's bytes, read in bounded chunks."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]

_CHUNK = 1 << 22


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Lowercase hex SHA-256 of the file's bytes as they are read now."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
