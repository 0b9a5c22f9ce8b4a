"""Model files as bytes on disk: GGUF sanity checks and digests (no llama.cpp needed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import BadRequest

__all__ = ["GGUF_MAGIC", "check_gguf", "file_sha256"]

GGUF_MAGIC = b"GGUF"
_HEADER = 24  # magic, version, tensor count, KV count


def check_gguf(path: Path, param: str = "model_path") -> None:
    """Refuse what is plainly not a GGUF file, before llama.cpp sees it."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER)
    except FileNotFoundError:
        raise BadRequest(f"{param}: no such file", param=param) from None
    except IsADirectoryError:
        raise BadRequest(f"{param}: is a directory, not a GGUF file", param=param) from None
    except OSError:
        raise BadRequest(f"{param}: cannot be read", param=param) from None
    if len(head) < _HEADER or head[:4] != GGUF_MAGIC:
        raise BadRequest(f"{param}: not a GGUF file (bad magic)", param=param)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()
