"""tools.modelgen: deterministic synthetic GGUF models that llama.cpp accepts.

Hermetic tests build a tiny vocab GGUF and a fake sdist tarball, so asset lookup, extraction and
the file layout are checked without network or the real sdist. Tests marked by the `real_model`
fixture use the real vocab from the cached llama-cpp-python sdist and skip when it is absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from pathlib import Path

import gguf
import numpy as np
import pytest

from tools.modelgen import PRESETS, ModelSpec, main, write_model

SDIST_MODELS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models"
TINY_TOKENS = ["<unk>", "<s>", "</s>", "▁a", "▁b", "▁c", "a", "b"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_shapes(spec: ModelSpec, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """numpy-order shapes (ggml ne reversed), as llama.cpp's llama loader expects them."""
    e, f, kv = spec.n_embd, spec.n_ff, spec.n_head_kv * (spec.n_embd // spec.n_head)
    shapes = {"token_embd.weight": (n_vocab, e), "output_norm.weight": (e,), "output.weight": (n_vocab, e)}
    for i in range(spec.n_layer):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (e,),
            f"blk.{i}.attn_q.weight": (e, e),
            f"blk.{i}.attn_k.weight": (kv, e),
            f"blk.{i}.attn_v.weight": (kv, e),
            f"blk.{i}.attn_output.weight": (e, e),
            f"blk.{i}.ffn_norm.weight": (e,),
            f"blk.{i}.ffn_gate.weight": (f, e),
            f"blk.{i}.ffn_up.weight": (f, e),
            f"blk.{i}.ffn_down.weight": (e, f),
        }
    return shapes


def _field(reader: gguf.GGUFReader, key: str):
    field = reader.get_field(key)
    assert field is not None, f"missing {key}"
    return field.contents()


def _write_tiny_vocab(path: Path) -> None:
    """A vocab-only GGUF shaped like the sdist's, including non-tokenizer keys that must not be copied."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-vocab")
    w.add_block_count(32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TINY_TOKENS)
    w.add_token_scores([0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0])
    w.add_token_types([2, 3, 3, 1, 1, 1, 1, 1])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(True)
    w.add_chat_template("from the vocab file: must not be copied")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def fake_sdist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """APPLIANCE_CACHE -> a temp dir holding a fake sdist with a tiny vocab and a template."""
    cache = tmp_path / "cache"
    (cache / "sdist").mkdir(parents=True)
    vocab = tmp_path / "ggml-vocab-tiny.gguf"
    _write_tiny_vocab(vocab)
    with tarfile.open(cache / "sdist" / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("llama_cpp_python-0.3.36/README.md"), io.BytesIO(b""))
        tar.add(vocab, f"{SDIST_MODELS}/ggml-vocab-tiny.gguf")
        data = b"{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
        info = tarfile.TarInfo(f"{SDIST_MODELS}/templates/tiny.jinja")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("APPLIANCE_CACHE", str(cache))
    monkeypatch.delenv("APPLIANCE_VOCAB_GGUF", raising=False)
    monkeypatch.delenv("APPLIANCE_CHAT_TEMPLATE", raising=False)
    return cache


TINY = ModelSpec(vocab="ggml-vocab-tiny.gguf", chat_template="tiny.jinja")


def test_tiny_vocab_layout_and_extraction(fake_sdist: Path, tmp_path: Path) -> None:
    out = write_model(tmp_path / "m.gguf", TINY)
    assert (fake_sdist / "vocab" / "ggml-vocab-tiny.gguf").is_file()  # extracted once, cached
    assert (fake_sdist / "vocab" / "templates" / "tiny.jinja").is_file()
    assert not list(tmp_path.glob(".m.gguf.*"))  # temp file renamed away

    r = gguf.GGUFReader(out)
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.name") == "appliance-demo"
    assert _field(r, "llama.block_count") == 2  # not the vocab file's 32
    assert _field(r, "llama.embedding_length") == 64
    assert _field(r, "llama.attention.head_count_kv") == 2
    assert _field(r, "llama.rope.dimension_count") == 16
    assert _field(r, "llama.vocab_size") == len(TINY_TOKENS)
    assert _field(r, "tokenizer.ggml.tokens") == TINY_TOKENS
    assert _field(r, "tokenizer.ggml.token_type") == [2, 3, 3, 1, 1, 1, 1, 1]
    assert _field(r, "tokenizer.ggml.add_bos_token") is True
    assert _field(r, "tokenizer.chat_template").startswith("{{ bos_token }}")
    assert {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors} == _expected_shapes(
        TINY, len(TINY_TOKENS)
    )
    output = next(t for t in r.tensors if t.name == "output.weight").data
    assert not output[:3].any() and output[3:].all()  # unk/bos/eos rows zeroed: never generated
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in r.tensors)


def test_tiny_dtypes_and_no_template(fake_sdist: Path, tmp_path: Path) -> None:
    q8 = gguf.GGUFReader(write_model(tmp_path / "q.gguf", dataclasses.replace(TINY, dtype="q8_0", chat_template=None)))
    assert q8.get_field("tokenizer.chat_template") is None
    assert _field(q8, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for t in q8.tensors:
        want = gguf.GGMLQuantizationType.F32 if t.name.endswith("norm.weight") else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
    f16 = gguf.GGUFReader(write_model(tmp_path / "h.gguf", dataclasses.replace(TINY, dtype="f16")))
    assert _field(f16, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert {t.tensor_type.name for t in f16.tensors} == {"F16", "F32"}


def test_missing_assets_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("APPLIANCE_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv("APPLIANCE_VOCAB_GGUF", raising=False)
    with pytest.raises(FileNotFoundError, match="ggml-vocab-llama-bpe.gguf.*APPLIANCE_VOCAB_GGUF"):
        write_model(tmp_path / "m.gguf")
    monkeypatch.setenv("APPLIANCE_VOCAB_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(FileNotFoundError, match="APPLIANCE_VOCAB_GGUF"):
        write_model(tmp_path / "m.gguf")
    with pytest.raises(FileNotFoundError, match="explicit"):
        write_model(tmp_path / "m.gguf", vocab_path=tmp_path / "also-nope.gguf")
    assert not list(tmp_path.glob("*.gguf*"))


@pytest.mark.parametrize(
    "bad",
    [
        {"n_embd": 66},  # not divisible by n_head
        {"n_head_kv": 3},
        {"dtype": "q4_0"},
        {"dtype": "q8_0", "n_ff": 100},
        {"n_layer": 0},
        {"seed": -1},
        {"vocab": "../etc/passwd"},
    ],
)
def test_spec_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        ModelSpec(**bad)


def test_presets() -> None:
    assert PRESETS["test"] == PRESETS["demo"] == ModelSpec()
    bench = PRESETS["bench"]
    e, f, kv, n_vocab = bench.n_embd, bench.n_ff, bench.n_head_kv * bench.n_embd // bench.n_head, 128256
    params = 2 * n_vocab * e + e + bench.n_layer * (2 * e * e + 2 * kv * e + 3 * e * f + 2 * e)
    assert bench.dtype == "q8_0" and 250e6 <= params <= 400e6


def test_cli_prints_path_and_sha256(fake_sdist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    argv = [str(out), "--vocab", "ggml-vocab-tiny.gguf", "--template", "none", "--n-embd", "32", "--seed", "7"]
    assert main(argv) == 0
    path, sha = capsys.readouterr().out.split()
    assert Path(path) == out and sha == _sha(out)
    assert gguf.GGUFReader(out).get_field("llama.embedding_length").contents() == 32
    assert main([str(out), "--n-head", "5"]) == 2  # invalid spec: error on stderr, exit 2


# --- the real vocab from the cached sdist --------------------------------------------------------


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default (demo/test) model: llama-bpe vocab, Llama 3.2 template, 2 tiny layers."""
    try:
        return write_model(tmp_path_factory.mktemp("real") / "demo.gguf")
    except FileNotFoundError as exc:
        pytest.skip(f"real vocab unavailable: {exc}")


def test_deterministic_bytes(real_model: Path, tmp_path: Path) -> None:
    again = write_model(tmp_path / "again.gguf")
    assert again.read_bytes() == real_model.read_bytes()
    other = write_model(tmp_path / "seed1.gguf", ModelSpec(seed=1))
    assert other.stat().st_size == real_model.stat().st_size
    assert _sha(other) != _sha(real_model)


def test_real_vocab_metadata(real_model: Path, tmp_path: Path) -> None:
    # GGUFReader needs ~9 s on the 128k-token bpe vocab, so read back the 32k-token spm one here.
    spec = ModelSpec(vocab="ggml-vocab-llama-spm.gguf")
    r = gguf.GGUFReader(write_model(tmp_path / "spm.gguf", spec))
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == _field(r, "llama.vocab_size") == len(_field(r, "tokenizer.ggml.scores"))
    assert "<|start_header_id|>" in _field(r, "tokenizer.chat_template")
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    assert shapes == _expected_shapes(spec, len(tokens))
    assert r.get_field("tokenizer.ggml.merges") is None  # spm has none; nothing leaks from elsewhere


def test_llama_cpp_loads_and_generates(real_model: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    from appliance.engine.llama import backend_init

    # Our libllama loads its CPU backend as a module (GGML_BACKEND_DL): register it first, as the
    # server does, or this test passes only after another test happened to.
    backend_init()
    llm = llama_cpp.Llama(model_path=str(real_model), n_ctx=256, n_threads=2, seed=0, verbose=False)
    try:
        assert llm.n_vocab() == 128256
        text = llm.create_completion("Once upon a time", max_tokens=16, temperature=0.0)["choices"][0]
        assert text["text"].strip() and text["finish_reason"] == "length"
        tokens: list[int] = []
        for token in llm.generate(llm.tokenize(b"Hello, my name is"), temp=0.0, top_k=1):
            tokens.append(token)
            if len(tokens) == 32:
                break
        assert len(tokens) == 32 and len(set(tokens)) >= 3
        assert not np.isin(tokens, [llm.token_eos(), llm.token_bos()]).any()
    finally:
        llm.close()
