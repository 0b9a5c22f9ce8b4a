"""Synthetic llama-architecture GGUF models (and a BERT reranker): a real tokenizer with seeded random weights.

Why: tests, demos and benchmarks need a model llama.cpp really loads, tokenizes with and decodes
from, but downloading real weights is slow, licensed and not reproducible offline. The tokenizer
(every `tokenizer.*` key, nothing else) is copied from one of the vocab-only GGUF files that ship
in the pinned llama-cpp-python sdist; the weights are seeded noise. The output is byte-for-byte
deterministic, so a model's sha256 can be pinned in tests and attestation fixtures.

`RerankerSpec` writes a tiny BERT-architecture cross-encoder instead: llama.cpp pooling `rank` and a
classification head (`cls.*`), the BERT vocabulary from the sdist, for /v1/rerank tests.

Usage: `python -m tools.modelgen OUT.gguf [--preset test|demo|bench|reranker] [--n-embd N] ...`
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import struct
import sys
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from appliance.digests import file_sha256

__all__ = ["ModelSpec", "RerankerSpec", "write_model", "PRESETS", "main"]

Dtype = Literal["f32", "f16", "q8_0"]

_SDIST_VERSION = "0.3.36"
_SDIST_NAME = f"llama_cpp_python-{_SDIST_VERSION}.tar.gz"
_SDIST_MODELS = f"llama_cpp_python-{_SDIST_VERSION}/vendor/llama.cpp/models"
_VOCAB_ENV = "APPLIANCE_VOCAB_GGUF"
_TEMPLATE_ENV = "APPLIANCE_CHAT_TEMPLATE"
_DTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")
_RMS_EPS = 1e-5
_LAYER_NORM_EPS = 1e-12  # BERT's
_ZEROS = -1.0  # a plan's std for "all zeros" (a norm's bias); 0.0 is "all ones" (a norm's weight)
_KEEP_F32 = frozenset({"position_embd.weight", "token_types.weight"})
"""Tensors written in f32 whatever the dtype, as llama.cpp's converter keeps them (BERT adds a row of
token_types by a view, which a quantized tensor cannot give)."""
_CHUNK_ROWS = 8192  # rows generated per numpy call: bounds peak memory on the bench preset


def _check_file_name(field: str, name: str) -> None:
    """Asset names are looked up inside fixed directories and the tarball: no paths allowed."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"ModelSpec.{field} must be a plain file name, got {name!r}")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the output bytes (together with the vocab/template file contents).

    `vocab` and `chat_template` are file names inside the sdist's `models/` and `models/templates/`
    directories; `chat_template=None` writes no template.
    """

    vocab: str = "ggml-vocab-llama-bpe.gguf"
    chat_template: str | None = "meta-llama-Llama-3.2-3B-Instruct.jinja"
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 0
    dtype: Dtype = "f32"
    rope_freq_base: float = 10000.0
    name: str = "appliance-demo"

    def __post_init__(self) -> None:
        for field in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelSpec.{field} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ModelSpec.seed must be a non-negative int, got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"ModelSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ModelSpec.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError("ModelSpec: head dimension n_embd/n_head must be even (RoPE rotates pairs)")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"ModelSpec.n_head ({self.n_head}) must be divisible by n_head_kv ({self.n_head_kv})")
        if self.dtype == "q8_0" and (self.n_embd % 32 or self.n_ff % 32):
            raise ValueError("ModelSpec: q8_0 needs n_embd and n_ff divisible by 32 (the Q8_0 block size)")
        if not self.rope_freq_base > 0:
            raise ValueError(f"ModelSpec.rope_freq_base must be > 0, got {self.rope_freq_base!r}")
        if not self.name:
            raise ValueError("ModelSpec.name must be non-empty")
        _check_file_name("vocab", self.vocab)
        if self.chat_template is not None:
            _check_file_name("chat_template", self.chat_template)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclasses.dataclass(frozen=True)
class RerankerSpec:
    """A BERT-architecture reranker (a cross-encoder): `general.architecture = bert`, non-causal,
    `bert.pooling_type` = rank, and the classification head llama.cpp's rank pooling applies to the
    first token's state (`cls.weight`/`cls.bias`, tanh, then `cls.output.weight`/`cls.output.bias`
    to one score). ~2.3 MB at the defaults, most of it the 30k-token vocabulary's embeddings.

    `rerank_template`: written as `tokenizer.chat_template.rerank` (llama-server lays out a query and
    a document by it, `{query}` and `{document}` replaced); None writes none (the BOS/EOS/SEP layout).
    """

    vocab: str = "ggml-vocab-bert-bge.gguf"
    rerank_template: str | None = None
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_ff: int = 128
    n_ctx_train: int = 512
    seed: int = 0
    dtype: Dtype = "q8_0"
    name: str = "appliance-reranker"

    def __post_init__(self) -> None:
        for field in ("n_embd", "n_layer", "n_head", "n_ff", "n_ctx_train"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"RerankerSpec.{field} must be a positive int, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"RerankerSpec.seed must be a non-negative int, got {self.seed!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"RerankerSpec.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"RerankerSpec.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.dtype == "q8_0" and (self.n_embd % 32 or self.n_ff % 32):
            raise ValueError("RerankerSpec: q8_0 needs n_embd and n_ff divisible by 32 (the Q8_0 block size)")
        if self.rerank_template is not None and "{query}" not in self.rerank_template:
            raise ValueError("RerankerSpec.rerank_template must hold {query} (and {document})")
        if not self.name:
            raise ValueError("RerankerSpec.name must be non-empty")
        _check_file_name("vocab", self.vocab)


PRESETS: Mapping[str, ModelSpec | RerankerSpec] = MappingProxyType(
    {
        "test": ModelSpec(),
        "demo": ModelSpec(),
        # Realistic shapes for throughput numbers (~398M params, ~63% of them in the 128k vocab's
        # embedding and output matrices); q8_0 as deployed models usually are.
        "bench": ModelSpec(
            n_embd=1024, n_layer=12, n_head=16, n_head_kv=4, n_ff=2816, dtype="q8_0", name="appliance-bench"
        ),
        "reranker": RerankerSpec(),
    }
)


# --- locating the vocab / template -------------------------------------------------------------


def _cache_dir() -> Path:
    """`${APPLIANCE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/appliance}` (empty counts as unset, like `:-`)."""
    if explicit := os.environ.get("APPLIANCE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "appliance"


def _find_asset(name: str, *, subdir: str, env: str, explicit: str | os.PathLike[str] | None) -> Path:
    """Resolve an asset: explicit path, then `$env` (a file, or a directory holding `name`), then
    the copy extracted from the cached sdist (extracting it once if needed)."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"{name}: explicit path {path} does not exist")
        return path
    if from_env := os.environ.get(env):
        path = Path(from_env)
        if path.is_dir():
            path = path / name
        if not path.is_file():
            raise FileNotFoundError(f"{name}: ${env}={from_env} does not name it (no file {path})")
        return path

    cache = _cache_dir()
    target = cache / subdir / name
    if target.is_file():
        return target
    sdist = cache / "sdist" / _SDIST_NAME
    member = f"{_SDIST_MODELS}/{'templates/' if 'templates' in subdir else ''}{name}"
    if not sdist.is_file():
        raise FileNotFoundError(
            f"{name}: not found. Pass its path, set ${env}, or place the sdist at {sdist} "
            f"(scripts/llama-wheel.sh caches it); {name} is extracted to {target}"
        )
    _extract_member(sdist, member, target)
    return target


def _extract_member(sdist: Path, member: str, target: Path) -> None:
    """Stream the tarball until `member` and copy only it out, atomically (parallel callers are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist, mode="r|gz") as tar:
        for info in tar:
            if info.name != member:
                continue
            if not info.isfile():
                raise FileNotFoundError(f"{member} in {sdist} is not a regular file")
            src = tar.extractfile(info)
            if src is None:
                raise FileNotFoundError(f"{member} in {sdist} could not be read")
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.chmod(tmp, 0o644)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
    raise FileNotFoundError(f"{member} is not in {sdist}")


# --- reading the tokenizer metadata ------------------------------------------------------------

# GGUF scalar value type id (gguf.GGUFValueType) -> struct format; numpy reads the same codes.
_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@functools.lru_cache(maxsize=4)
def _read_tokenizer_kv(path: str, _stamp: tuple[int, int]) -> tuple[tuple[str, int, Any, int | None], ...]:
    """The `tokenizer.*` KV pairs of a GGUF file, in file order, as (key, type, value, sub_type).

    A minimal parser instead of `gguf.GGUFReader`, which takes ~9 s on the 128k-token llama-bpe vocab
    (it builds a numpy view per string); this takes well under a second. `_stamp` (size, mtime)
    keys the cache so an edited file is re-read.
    """
    buf = memoryview(Path(path).read_bytes())
    if bytes(buf[:4]) != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file")
    version, _n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian files are not supported)")
    pos = 24

    def read_str() -> bytes:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        s = bytes(buf[pos + 8 : pos + 8 + n])
        pos += 8 + n
        return s

    out: list[tuple[str, int, Any, int | None]] = []
    for _ in range(n_kv):
        key = read_str().decode("utf-8")
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        sub: int | None = None
        value: Any
        if vtype == _STRING:
            value = read_str().decode("utf-8")
        elif vtype in _SCALARS:
            (value,) = struct.unpack_from("<" + _SCALARS[vtype], buf, pos)
            pos += struct.calcsize(_SCALARS[vtype])
        elif vtype == _ARRAY:
            sub, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if sub == _STRING:
                value = [read_str() for _ in range(n)]  # raw bytes: re-written verbatim
            elif sub in _SCALARS:
                arr = np.frombuffer(buf, dtype=np.dtype("<" + _SCALARS[sub]), count=n, offset=pos)
                pos += arr.nbytes
                value = arr.tolist()
            else:
                raise ValueError(f"{path}: key {key!r} has an unsupported array element type {sub}")
        else:
            raise ValueError(f"{path}: key {key!r} has an unknown value type {vtype}")
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            out.append((key, vtype, value, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{path}: has no tokenizer.ggml.tokens; not a vocab GGUF")
    return tuple(out)


def _tokenizer_kv(path: Path) -> tuple[tuple[str, int, Any, int | None], ...]:
    st = path.stat()
    return _read_tokenizer_kv(str(path.resolve()), (st.st_size, st.st_mtime_ns))


# --- weights ------------------------------------------------------------------------------------


def _tensor_plan(spec: ModelSpec, n_vocab: int) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, numpy shape, std) for every tensor, in file order; std 0 means "all ones" (a norm).

    numpy shapes are ggml `ne` reversed, i.e. (out_features, in_features) as in the HF convert
    scripts: token_embd is (n_vocab, n_embd), attn_k is (n_head_kv * head_dim, n_embd).

    Scales (why not a flat 0.02): with 0.02 everywhere, a 12-layer 1024-wide stack drowns the
    token embedding in residual-stream noise and greedy decoding falls into a 1-2 token loop.
    Here the embedding has unit scale, read projections 1/sqrt(fan_in) (unit-scale activations),
    and the residual writes (attn_output, ffn_down) a further 1/sqrt(2 * n_layer) (GPT-2 style),
    so the current token and its context both steer the next one and text stays varied at any
    depth. The output gets 2/sqrt(n_embd) (logit std ~2): argmax ignores scale, but sampling at
    temperature 1 is then peaked rather than uniform over 128k tokens.
    """
    e, f, kv = spec.n_embd, spec.n_ff, spec.n_head_kv * spec.head_dim
    read_e = e**-0.5
    write_e, write_f = (e * 2 * spec.n_layer) ** -0.5, (f * 2 * spec.n_layer) ** -0.5
    plan: list[tuple[str, tuple[int, ...], float]] = [("token_embd.weight", (n_vocab, e), 1.0)]
    for i in range(spec.n_layer):
        plan += [
            (f"blk.{i}.attn_norm.weight", (e,), 0.0),
            (f"blk.{i}.attn_q.weight", (e, e), read_e),
            (f"blk.{i}.attn_k.weight", (kv, e), read_e),
            (f"blk.{i}.attn_v.weight", (kv, e), read_e),
            (f"blk.{i}.attn_output.weight", (e, e), write_e),
            (f"blk.{i}.ffn_norm.weight", (e,), 0.0),
            (f"blk.{i}.ffn_gate.weight", (f, e), read_e),
            (f"blk.{i}.ffn_up.weight", (f, e), read_e),
            (f"blk.{i}.ffn_down.weight", (e, f), write_f),
        ]
    plan += [("output_norm.weight", (e,), 0.0), ("output.weight", (n_vocab, e), 2.0 * read_e)]
    return plan


def _bert_tensor_plan(spec: RerankerSpec, n_vocab: int, n_token_types: int) -> list[tuple[str, tuple[int, ...], float]]:
    """The BERT reranker's tensors as llama.cpp's bert loader and rank pooling read them (src/models/
    bert.cpp, llama-graph.cpp build_pooling): (name, numpy shape, std); std 0 means all ones, _ZEROS
    all zeros. Post-norm layers (LayerNorm after each residual add) keep activations at unit scale
    whatever the weights, so every projection reads at 1/sqrt(fan_in); biases are small noise so that
    they count. The score head's output gets 2/sqrt(n_embd): scores of a few units, spread across
    documents.
    """
    e, f = spec.n_embd, spec.n_ff
    read_e, read_f, bias = e**-0.5, f**-0.5, 0.1
    plan: list[tuple[str, tuple[int, ...], float]] = [
        ("token_embd.weight", (n_vocab, e), 1.0),
        ("token_types.weight", (n_token_types, e), 0.5),
        ("position_embd.weight", (spec.n_ctx_train, e), 0.5),
        ("token_embd_norm.weight", (e,), 0.0),
        ("token_embd_norm.bias", (e,), _ZEROS),
    ]
    for i in range(spec.n_layer):
        plan += [
            (f"blk.{i}.attn_q.weight", (e, e), read_e),
            (f"blk.{i}.attn_q.bias", (e,), bias),
            (f"blk.{i}.attn_k.weight", (e, e), read_e),
            (f"blk.{i}.attn_k.bias", (e,), bias),
            (f"blk.{i}.attn_v.weight", (e, e), read_e),
            (f"blk.{i}.attn_v.bias", (e,), bias),
            (f"blk.{i}.attn_output.weight", (e, e), read_e),
            (f"blk.{i}.attn_output.bias", (e,), bias),
            (f"blk.{i}.attn_output_norm.weight", (e,), 0.0),
            (f"blk.{i}.attn_output_norm.bias", (e,), _ZEROS),
            (f"blk.{i}.ffn_up.weight", (f, e), read_e),
            (f"blk.{i}.ffn_up.bias", (f,), bias),
            (f"blk.{i}.ffn_down.weight", (e, f), read_f),
            (f"blk.{i}.ffn_down.bias", (e,), bias),
            (f"blk.{i}.layer_output_norm.weight", (e,), 0.0),
            (f"blk.{i}.layer_output_norm.bias", (e,), _ZEROS),
        ]
    plan += [
        ("cls.weight", (e, e), read_e),
        ("cls.bias", (e,), bias),
        ("cls.output.weight", (1, e), 2.0 * read_e),
        ("cls.output.bias", (1,), bias),
    ]
    return plan


_Encode = Callable[[np.ndarray], np.ndarray]


def _encoder(dtype: str, ndim: int) -> tuple[_Encode, Any, Callable[[tuple[int, ...]], int]]:
    """(encode f32 rows, ggml type, nbytes for a numpy shape). Norms (1-D) always stay f32,
    as in llama.cpp's own quantizer."""
    import gguf

    t = gguf.GGMLQuantizationType
    if ndim == 1 or dtype == "f32":
        return (lambda a: a), t.F32, lambda s: int(np.prod(s)) * 4
    if dtype == "f16":
        return (lambda a: a.astype(np.float16)), t.F16, lambda s: int(np.prod(s)) * 2
    block, size = gguf.GGML_QUANT_SIZES[t.Q8_0]
    return (lambda a: gguf.quants.quantize(a, t.Q8_0)), t.Q8_0, lambda s: int(np.prod(s)) // block * size


def _generate(
    rng: np.random.Generator, shape: tuple[int, ...], std: float, encode: _Encode, zero_rows: np.ndarray | None
) -> np.ndarray:
    """One tensor, generated and encoded in row chunks (bounded memory, same bytes regardless of
    the host). `zero_rows` masks rows to 0."""
    if std == 0.0:
        return encode(np.ones(shape, dtype=np.float32))
    if std == _ZEROS:
        return encode(np.zeros(shape, dtype=np.float32))
    parts = []
    for start in range(0, shape[0], _CHUNK_ROWS):
        rows = min(_CHUNK_ROWS, shape[0] - start)
        chunk = rng.standard_normal((rows, *shape[1:]), dtype=np.float32)
        chunk *= np.float32(std)
        if zero_rows is not None:
            chunk[zero_rows[start : start + rows]] = 0.0
        parts.append(encode(chunk))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


# --- writing ------------------------------------------------------------------------------------


def write_model(
    path: str | os.PathLike[str],
    spec: ModelSpec | RerankerSpec = ModelSpec(),
    *,
    vocab_path: str | os.PathLike[str] | None = None,
    template_path: str | os.PathLike[str] | None = None,
) -> Path:
    """Write `spec` as a GGUF file at `path` (atomically: temp file in the same dir + os.replace).

    Deterministic: the bytes depend only on `spec` and the vocab/template file contents.
    Only tokens of type NORMAL get non-zero output-projection rows, so greedy and sampled decoding
    never emit EOS/EOT/control (or SPM byte) tokens: generations always run to max_tokens, and the
    detokenized text is never empty. Returns the path written.

    A `RerankerSpec` writes its BERT reranker (`template_path` does not apply: its template is text).
    """
    if isinstance(spec, RerankerSpec):
        return _write_reranker(path, spec, vocab_path=vocab_path)[0]
    return _write_model(path, spec, vocab_path=vocab_path, template_path=template_path)[0]


def _common_header(writer: Any, spec: Any) -> None:
    """The shape key-values every generated model has, in the order the writers always added them."""
    writer.add_name(spec.name)
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)


def _tokenizer_header(writer: Any, n_vocab: int, file_type: Any, tok_kv: Any) -> None:
    """The vocabulary size, file type and the tokenizer's key-values copied from the vocab GGUF."""
    import gguf

    writer.add_vocab_size(n_vocab)
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, vtype, value, sub in tok_kv:
        sub_type = None if sub is None else gguf.GGUFValueType(sub)
        writer.add_key_value(key, value, gguf.GGUFValueType(vtype), sub_type)


def _write_gguf(
    out: Path, arch: str, plan: list[tuple[str, tuple[int, ...], float]], header: Callable[[Any], None], *,
    seed: int, dtype_of: Callable[[str], str], mask_of: Callable[[str], Any],
) -> None:
    """Write a generated model to `out` atomically (a temporary file, then a rename): `header(writer)`
    adds the key-values; every tensor of `plan` is declared first, then generated from `seed` and
    written one at a time (the bench preset's f32 intermediates would not fit comfortably in memory
    all at once), each in `dtype_of(name)`, with `mask_of(name)` rows held down."""
    import gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    writer: gguf.GGUFWriter | None = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        header(writer)
        for name, shape, _ in plan:
            _, qtype, nbytes = _encoder(dtype_of(name), len(shape))
            writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        rng = np.random.Generator(np.random.PCG64(seed))
        for name, shape, std in plan:
            encode, _, _ = _encoder(dtype_of(name), len(shape))
            writer.write_tensor_data(_generate(rng, shape, std, encode, mask_of(name)))
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise


def _write_model(
    path: str | os.PathLike[str],
    spec: ModelSpec,
    *,
    vocab_path: str | os.PathLike[str] | None,
    template_path: str | os.PathLike[str] | None,
) -> tuple[Path, int]:
    """write_model, also returning the parameter count (for the CLI)."""
    import gguf

    if not isinstance(spec, ModelSpec):
        raise ValueError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    out = Path(path)
    vocab_file = _find_asset(spec.vocab, subdir="vocab", env=_VOCAB_ENV, explicit=vocab_path)
    tok_kv = _tokenizer_kv(vocab_file)
    template: str | None = None
    if spec.chat_template is not None:
        template_file = _find_asset(
            spec.chat_template, subdir="vocab/templates", env=_TEMPLATE_ENV, explicit=template_path
        )
        template = template_file.read_text(encoding="utf-8")

    tokens = next(v for k, _, v, _ in tok_kv if k == "tokenizer.ggml.tokens")
    n_vocab = len(tokens)
    types = next((v for k, _, v, _ in tok_kv if k == "tokenizer.ggml.token_type"), None)
    suppress = None if types is None else np.asarray(types) != int(gguf.TokenType.NORMAL)

    ftypes = gguf.LlamaFileType
    file_type = {"f32": ftypes.ALL_F32, "f16": ftypes.MOSTLY_F16, "q8_0": ftypes.MOSTLY_Q8_0}[spec.dtype]
    plan = _tensor_plan(spec, n_vocab)

    def header(writer: gguf.GGUFWriter) -> None:
        _common_header(writer, spec)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_layer_norm_rms_eps(_RMS_EPS)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(float(spec.rope_freq_base))
        _tokenizer_header(writer, n_vocab, file_type, tok_kv)
        if template is not None:
            writer.add_chat_template(template)

    _write_gguf(out, "llama", plan, header, seed=spec.seed, dtype_of=lambda name: spec.dtype,
                mask_of=lambda name: suppress if name == "output.weight" else None)
    return out, sum(int(np.prod(shape)) for _, shape, _ in plan)


def _write_reranker(
    path: str | os.PathLike[str], spec: RerankerSpec, *, vocab_path: str | os.PathLike[str] | None
) -> tuple[Path, int]:
    """write_model for a RerankerSpec, also returning the parameter count."""
    import gguf

    out = Path(path)
    vocab_file = _find_asset(spec.vocab, subdir="vocab", env=_VOCAB_ENV, explicit=vocab_path)
    tok_kv = _tokenizer_kv(vocab_file)
    n_vocab = len(next(v for k, _, v, _ in tok_kv if k == "tokenizer.ggml.tokens"))
    n_token_types = next((int(v) for k, _, v, _ in tok_kv if k == "tokenizer.ggml.token_type_count"), None)
    ftypes = gguf.LlamaFileType
    file_type = {"f32": ftypes.ALL_F32, "f16": ftypes.MOSTLY_F16, "q8_0": ftypes.MOSTLY_Q8_0}[spec.dtype]
    plan = _bert_tensor_plan(spec, n_vocab, n_token_types or 2)

    def header(writer: gguf.GGUFWriter) -> None:
        _common_header(writer, spec)
        writer.add_layer_norm_eps(_LAYER_NORM_EPS)
        writer.add_causal_attention(False)
        writer.add_pooling_type(gguf.PoolingType.RANK)
        _tokenizer_header(writer, n_vocab, file_type, tok_kv)
        if n_token_types is None:  # llama.cpp's bert loader needs it
            writer.add_token_type_count(2)
        if spec.rerank_template is not None:
            writer.add_key_value("tokenizer.chat_template.rerank", spec.rerank_template, gguf.GGUFValueType.STRING)

    _write_gguf(out, "bert", plan, header, seed=spec.seed,
                dtype_of=lambda name: "f32" if name in _KEEP_F32 else spec.dtype, mask_of=lambda name: None)
    return out, sum(int(np.prod(shape)) for _, shape, _ in plan)


# --- CLI ----------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.modelgen", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="output .gguf path")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="base spec (flags override it)")
    for flag in ("n-embd", "n-layer", "n-ff", "n-head", "n-head-kv", "seed"):
        p.add_argument(f"--{flag}", type=int, default=None)
    p.add_argument("--dtype", choices=_DTYPES, default=None)
    p.add_argument("--vocab", default=None, help="vocab GGUF file name in the sdist's models/")
    p.add_argument("--template", default=None, help="chat template file name in models/templates/, or 'none' "
                   "(the reranker preset: its rerank template text, {query} and {document})")
    p.add_argument("--name", default=None, help="general.name")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: write the model, print its path and sha256 on stdout (parameter count on stderr)."""
    args = _parser().parse_args(argv)
    fields = ("n_embd", "n_layer", "n_ff", "n_head", "n_head_kv", "seed", "dtype", "vocab", "name")
    overrides: dict[str, Any] = {f: getattr(args, f) for f in fields if getattr(args, f) is not None}
    preset = PRESETS[args.preset]
    if args.template is not None:
        template = None if args.template.lower() == "none" else args.template
        overrides["rerank_template" if isinstance(preset, RerankerSpec) else "chat_template"] = template
    try:
        known = {f.name for f in dataclasses.fields(preset)}
        if unknown := sorted(set(overrides) - known):
            raise ValueError(f"the {args.preset} preset has no {', '.join(unknown)}")
        spec = dataclasses.replace(preset, **overrides)
        if isinstance(spec, RerankerSpec):
            out, n_params = _write_reranker(args.out, spec, vocab_path=None)
        else:
            out, n_params = _write_model(args.out, spec, vocab_path=None, template_path=None)
    except (ValueError, FileNotFoundError) as exc:
        print(f"modelgen: error: {exc}", file=sys.stderr)
        return 2
    print(f"params: {n_params:,}  bytes: {out.stat().st_size:,}", file=sys.stderr)
    print(out)
    print(file_sha256(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
