"""The attack from issue 16, automated: a host that rewrites a served model file in place (same inode,
same size) and drops the page cache. The answer must not change, and the digest in /status and the
claims must still be the digest of the bytes in use. The same attack on a model mapped from disk
(use_mmap = true, the operator vouching for the disk) shows that it bites."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_SIMULATED = '[attestation]\nprovider = "simulated"\n'


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _greedy(server) -> str:
    r = server.post("/v1/completions", json={"model": "m", "prompt": "Once upon a time", "max_tokens": 16,
                                             "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _overwrite_in_place(path: Path) -> None:
    """Rewrite the second half of the file (tensor data) with other bytes: same inode, same size."""
    before = path.stat()
    with open(path, "r+b") as f:
        f.seek(before.st_size // 2)
        f.write(os.urandom(before.st_size - before.st_size // 2))
        f.flush()
        os.fsync(f.fileno())
    after = path.stat()
    assert (after.st_ino, after.st_size) == (before.st_ino, before.st_size)


def _evict(path: Path) -> str:
    """Drop the file's clean pages, as memory pressure would: the whole page cache where we may."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def _model(server) -> dict:
    return server.status_of("m")


def _claimed(server) -> dict:
    r = server.get("/v1/attestation", params={"nonce": "cd" * 32})
    assert r.status_code == 200, r.text
    (m,) = [m for m in r.json()["claims"]["models"] if m["name"] == "m"]
    return m


def test_rewritten_file_changes_nothing_served(start_server, model_files, tmp_path):
    path = Path(shutil.copy(model_files.main, tmp_path / "copy.gguf"))
    original = _sha(path)
    server = start_server(models={"m": path}, config=_SIMULATED, name="bytes-memory")
    try:
        before = _greedy(server)
        assert _model(server)["sha256"] == original and _model(server)["mmap"] is False
        assert _claimed(server) == {"name": "m", "sha256": original, "mmap": False}
        _overwrite_in_place(path)
        how = _evict(path)
        assert _sha(path) != original
        assert _greedy(server) == before, f"the answer changed after the file was rewritten ({how})"
        assert _model(server)["sha256"] == original  # still the digest of the bytes in use
    finally:
        server.stop()


def test_with_mmap_the_same_attack_changes_the_answer(start_server, model_files, tmp_path):
    # The control: the attack is real, so the test above can fail. Here the digest reported is no longer
    # the digest of the weights answering, which is why the claims say `mmap: true` and a verifier's
    # default policy refuses it.
    path = Path(shutil.copy(model_files.main, tmp_path / "copy.gguf"))
    original = _sha(path)
    server = start_server(models={"m": path}, config=_SIMULATED + "[model_defaults]\nuse_mmap = true\n", name="bytes-mmap")
    try:
        before = _greedy(server)
        assert _model(server)["mmap"] is True and _claimed(server)["mmap"] is True
        _overwrite_in_place(path)
        _evict(path)
        assert _greedy(server) != before
        assert _model(server)["sha256"] == original != _sha(path)
    finally:
        server.stop()
