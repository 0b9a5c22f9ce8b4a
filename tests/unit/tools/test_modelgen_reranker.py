"""tools.modelgen's BERT reranker (RerankerSpec): the keys and tensors llama.cpp's bert loader and rank
pooling read, deterministic bytes, validation, and the CLI preset. Uses the BERT vocabulary from the
cached llama-cpp-python sdist (the one every generated model needs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import pytest

from tools.modelgen import PRESETS, RerankerSpec, main, write_model


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return write_model(tmp_path_factory.mktemp("rr") / "rr.gguf", RerankerSpec())
    except FileNotFoundError as exc:
        pytest.fail(f"cannot build the reranker: {exc}")


def test_keys_and_tensors(reranker: Path) -> None:
    r = gguf.GGUFReader(reranker)

    def field(key: str):
        f = r.get_field(key)
        assert f is not None, key
        return f.contents()

    assert field("general.architecture") == "bert" and field("bert.pooling_type") == 4
    assert field("bert.attention.causal") is False and field("tokenizer.ggml.model") == "bert"
    assert field("tokenizer.ggml.token_type_count") == 2 and field("bert.context_length") == 512
    assert r.get_field("tokenizer.chat_template.rerank") is None
    spec = RerankerSpec()
    e, f, n_vocab = spec.n_embd, spec.n_ff, len(field("tokenizer.ggml.tokens"))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in r.tensors}
    expected = {"token_embd.weight": (n_vocab, e), "token_types.weight": (2, e), "position_embd.weight": (512, e),
                "token_embd_norm.weight": (e,), "token_embd_norm.bias": (e,), "cls.weight": (e, e), "cls.bias": (e,),
                "cls.output.weight": (1, e), "cls.output.bias": (1,)}
    for i in range(spec.n_layer):
        for p in ("attn_q", "attn_k", "attn_v", "attn_output"):
            expected |= {f"blk.{i}.{p}.weight": (e, e), f"blk.{i}.{p}.bias": (e,)}
        expected |= {f"blk.{i}.ffn_up.weight": (f, e), f"blk.{i}.ffn_up.bias": (f,), f"blk.{i}.ffn_down.weight": (e, f),
                     f"blk.{i}.ffn_down.bias": (e,)}
        for p in ("attn_output_norm", "layer_output_norm"):
            expected |= {f"blk.{i}.{p}.weight": (e,), f"blk.{i}.{p}.bias": (e,)}
    assert shapes == expected
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["token_embd.weight"] == types["cls.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["token_types.weight"] == types["position_embd.weight"] == gguf.GGMLQuantizationType.F32
    assert reranker.stat().st_size < 4 << 20  # a few MB: the 30k-token vocabulary, mostly


def test_deterministic_and_seeded(reranker: Path, tmp_path: Path) -> None:
    assert _sha(write_model(tmp_path / "again.gguf", RerankerSpec())) == _sha(reranker)
    assert _sha(write_model(tmp_path / "seed1.gguf", RerankerSpec(seed=1))) != _sha(reranker)


def test_rerank_template(tmp_path: Path) -> None:
    template = "[CLS]{query}[SEP]{document}[SEP]"
    r = gguf.GGUFReader(write_model(tmp_path / "t.gguf", RerankerSpec(rerank_template=template)))
    assert r.get_field("tokenizer.chat_template.rerank").contents() == template


@pytest.mark.parametrize("bad", [{"n_embd": 0}, {"n_embd": 63, "n_head": 4}, {"dtype": "q8_0", "n_ff": 100},
                                 {"seed": -1}, {"vocab": "../x.gguf"}, {"rerank_template": "no placeholders"},
                                 {"dtype": "q4_0"}])
def test_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        RerankerSpec(**bad)


def test_cli_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert PRESETS["reranker"] == RerankerSpec()
    out = tmp_path / "cli.gguf"
    assert main([str(out), "--preset", "reranker", "--seed", "3", "--template", "{query}|{document}"]) == 0
    path, sha = capsys.readouterr().out.split()
    assert Path(path) == out and sha == _sha(out)
    assert _sha(out) == _sha(write_model(tmp_path / "same.gguf", RerankerSpec(seed=3, rerank_template="{query}|{document}")))
    assert main([str(out), "--preset", "reranker", "--n-head-kv", "2"]) == 2  # no such field: an error, not a crash
    assert "n_head_kv" in capsys.readouterr().err
