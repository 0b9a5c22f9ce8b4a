"""What this process is: the binary digest from the bytes running, and the frozen binary's extracted
files checked against the digests recorded at build time."""

from __future__ import annotations

import hashlib
import sys
import types
from pathlib import Path

import pytest

from appliance import buildinfo


@pytest.fixture
def frozen(monkeypatch, tmp_path):
    """A pretend one-file binary: sys.frozen, an extraction directory, and the build's digest table."""
    files = {"libfoo.so": b"\x7fELF foo", "llama_cpp/lib/libggml-cpu-x64.so": b"\x7fELF ggml", "data/x.txt": b"x"}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    table = types.ModuleType("_appliance_bundle")
    table.DIGESTS = {rel: (hashlib.sha256(data).hexdigest(),) for rel, data in files.items()}
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    monkeypatch.setitem(sys.modules, "_appliance_bundle", table)
    return tmp_path


def test_source_install_has_nothing_extracted_to_check():
    assert buildinfo.verify_bundle() == 0


def test_extracted_files_matching_the_build_pass(frozen):
    assert buildinfo.verify_bundle() == 3
    assert buildinfo.verify_bundle("llama_cpp/lib/") == 1


def test_a_changed_or_missing_extracted_file_is_refused(frozen):
    (frozen / "llama_cpp/lib/libggml-cpu-x64.so").write_bytes(b"\x7fELF evil")
    (frozen / "data/x.txt").unlink()
    with pytest.raises(RuntimeError, match=r"extracted files differ from this binary's build: ") as e:
        buildinfo.verify_bundle()
    assert "llama_cpp/lib/libggml-cpu-x64.so" in str(e.value) and "data/x.txt (missing)" in str(e.value)
    assert "libfoo.so" not in str(e.value)
    assert buildinfo.verify_bundle("libfoo") == 1  # only what the prefix names is checked


def test_frozen_binary_digest_is_of_the_file_this_process_runs(frozen, monkeypatch):
    buildinfo.binary_digest.cache_clear()
    monkeypatch.setattr(sys, "executable", "/nonexistent/renamed-away")  # the path no longer matters
    try:
        kind, digest = buildinfo.binary_digest()
        assert kind == "frozen"
        assert digest == hashlib.sha256(Path("/proc/self/exe").read_bytes()).hexdigest()
    finally:
        buildinfo.binary_digest.cache_clear()
