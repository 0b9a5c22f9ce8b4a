"""What the engine's unit tests share: one small synthetic model (real vocabulary, seeded Q8_0 weights),
built once per run."""

import pytest

from tools.modelgen import ModelSpec, write_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    try:
        return write_model(tmp_path_factory.mktemp("engine") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
