"""engine/memory.py: the KV-cache bound of a context, and the memory left to put it in."""

from pathlib import Path

import pytest

from appliance.engine.errors import LoadRefused
from appliance.engine.llama import LlamaModel
from appliance.engine.memory import HEADROOM_BYTES, KvEstimate, available_bytes, check_fits, kv_estimate
from tools.modelgen import ModelSpec, write_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    m = LlamaModel(path)
    yield m
    m.close()


def test_estimate_reads_the_models_shape(model):
    # The test model: 2 layers, 4 heads of 16 over n_embd 64, 2 KV heads -> 32 key and 32 value
    # elements per cell per layer, F16.
    est = kv_estimate(model.ptr, model.meta, n_ctx_seq=256, n_seq=2)
    assert (est.n_layer, est.k_width, est.v_width, est.cells) == (2, 32, 32, 512)
    assert est.bytes == 2 * 64 * 2 * 512


def _root(tmp_path: Path, meminfo_kib: int | None, limit: str | None = None, current: int = 0) -> Path:
    (tmp_path / "proc" / "self").mkdir(parents=True)
    if meminfo_kib is not None:
        (tmp_path / "proc" / "meminfo").write_text(f"MemTotal: 99999999 kB\nMemAvailable: {meminfo_kib} kB\n")
    if limit is not None:
        (tmp_path / "proc" / "self" / "cgroup").write_text("0::/pod/app\n")
        cg = tmp_path / "sys" / "fs" / "cgroup" / "pod" / "app"
        cg.mkdir(parents=True)
        (cg / "memory.max").write_text(limit + "\n")
        (cg / "memory.current").write_text(f"{current}\n")
    return tmp_path


def test_available_is_memavailable_or_a_nearer_cgroup_limit(tmp_path):
    assert available_bytes(_root(tmp_path / "a", 4 << 20)) == 4 << 30
    assert available_bytes(_root(tmp_path / "b", 4 << 20, limit="max")) == 4 << 30
    assert available_bytes(_root(tmp_path / "c", 4 << 20, limit=str(3 << 30), current=1 << 30)) == 2 << 30
    assert available_bytes(_root(tmp_path / "d", None)) is None


def test_check_fits_refuses_with_the_numbers():
    est = KvEstimate(n_layer=10, k_width=512, v_width=512, cells=1 << 20)  # 20 GiB
    with pytest.raises(LoadRefused) as info:
        check_fits("m", est, n_ctx_seq=1 << 18, n_seq=4, available=lambda: 8 << 30)
    e = info.value
    assert e.subject == "n_ctx"
    assert "n_ctx 262144 x parallel 4" in e.message and "20.00 GiB" in e.message and "8.00 GiB" in e.message
    check_fits("m", est, n_ctx_seq=1 << 18, n_seq=4, available=lambda: est.bytes + HEADROOM_BYTES)
    check_fits("m", est, n_ctx_seq=1 << 18, n_seq=4, available=lambda: None)  # unknown: not refused
