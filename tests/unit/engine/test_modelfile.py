"""One read, one digest: the bytes llama.cpp runs are the bytes that were hashed, whatever happens to
the file afterwards (in-process, real llama.cpp, generated models)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from appliance.engine.events import Delta, Failed, GenerationRequest
from appliance.engine.llama import SamplingParams
from appliance.engine.modelfile import read_sealed
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from tools.modelgen import ModelSpec, write_model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bytes")
    try:
        return (write_model(d / "a.gguf", ModelSpec(dtype="q8_0", seed=0)),
                write_model(d / "b.gguf", ModelSpec(dtype="q8_0", seed=1)))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test models: {e}")


@pytest.fixture(scope="module")
def answers(models) -> dict[Path, str]:
    """Each model's greedy answer, loaded the plain way; they differ, or the tests below prove nothing."""
    out = {}
    for i, path in enumerate(models):
        registry = ModelRegistry()
        load(registry, f"ref{i}", path)
        out[path] = greedy(registry, f"ref{i}")
        registry.stop_all()
    assert out[models[0]] != out[models[1]]
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def greedy(registry: ModelRegistry, name: str, n: int = 12) -> str:
    engine = registry.get(name)
    prompt = tuple(engine.model.tokenize("Once upon a time"))
    gen = engine.submit(GenerationRequest(prompt, n, SamplingParams(temperature=0.0, seed=1), ignore_eos=True))
    text = ""
    for ev in gen.events():
        if isinstance(ev, Delta):
            text += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
    return text


def load(registry: ModelRegistry, name: str, path: Path, **kw):
    return registry.load(Settings().model_settings(name, path, n_ctx=128, parallel=1, n_threads=1, **kw))


def test_sealed_copy_refuses_every_change(models):
    sealed = read_sealed(models[0])
    try:
        assert sealed.sha256 == sha(models[0]) and sealed.size == models[0].stat().st_size
        assert fcntl.fcntl(sealed.fd, fcntl.F_GET_SEALS) & (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        with pytest.raises(PermissionError):
            os.write(sealed.fd, b"x")
        with pytest.raises(PermissionError):
            os.ftruncate(sealed.fd, 1)
        assert sealed.path.read_bytes()[:4] == b"GGUF"
    finally:
        sealed.close()


def test_a_file_swapped_after_it_was_read_is_never_served(models, answers, tmp_path):
    a, b = models
    expected = answers[a]

    path = Path(shutil.copy(a, tmp_path / "m.gguf"))
    swapped = []

    def swap(p: Path) -> None:  # between reading the bytes and loading them
        shutil.copyfile(b, p)
        swapped.append(sha(p))

    registry = ModelRegistry(after_read=swap)
    rec = load(registry, "m", path)
    try:
        assert swapped == [sha(b)] and sha(path) == sha(b)
        assert rec.sha256 == sha(a) and rec.mmap is False  # the digest of the bytes read, and in use:
        assert greedy(registry, "m") == expected  # the model answers as `a`, not as the file now on disk
        assert str(path) not in Path("/proc/self/maps").read_text()  # the file itself is not mapped
    finally:
        registry.stop_all()


def test_with_mmap_a_swapped_file_is_what_runs(models, answers, tmp_path):
    # Why mapping needs a disk the operator vouches for (use_mmap = true): the same swap, between
    # hashing and mapping, and the model that answers is not the one the digest names.
    a, b = models
    of_b = answers[b]

    path = Path(shutil.copy(a, tmp_path / "m.gguf"))
    registry = ModelRegistry(after_read=lambda p: shutil.copyfile(b, p))
    rec = load(registry, "m", path, use_mmap=True)
    try:
        assert rec.mmap is True and rec.sha256 == sha(a)
        assert greedy(registry, "m") == of_b
    finally:
        registry.stop_all()


def test_mmap_default_follows_the_registry_and_the_setting_wins(models):
    registry = ModelRegistry(default_mmap=True)
    s = Settings()
    assert registry.mmap_of(s.model_settings("x", models[0])) is True
    assert registry.mmap_of(s.model_settings("x", models[0], use_mmap=False)) is False
    assert ModelRegistry().mmap_of(s.model_settings("x", models[0])) is False


def test_the_kernels_shared_memory_huge_page_mode_is_read(monkeypatch, tmp_path):
    from appliance.engine import modelfile

    f = tmp_path / "shmem_enabled"
    f.write_text("always within_size advise [never] deny force\n")
    monkeypatch.setattr(modelfile, "_SHMEM_THP", f)
    assert modelfile.shmem_huge_pages() == "never"
    f.write_text("always [within_size] advise never deny force\n")
    assert modelfile.shmem_huge_pages() == "within_size"
    monkeypatch.setattr(modelfile, "_SHMEM_THP", tmp_path / "absent")
    assert modelfile.shmem_huge_pages() is None
