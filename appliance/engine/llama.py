"""The one place that touches llama.cpp's C API (through llama-cpp-python's ctypes bindings).

Everything here is blocking C work: call it from a real OS thread (the model's scheduler thread or
the hub's thread pool), never from a greenlet on the event loop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import mmap
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llama_cpp.llama_cpp as C
import numpy as np

from appliance.buildinfo import verify_bundle
from appliance.osthreads import real_lock

__all__ = [
    "LlamaModel", "LlamaContext", "Batch", "SamplerChain", "SamplingParams", "Grammar", "NO_TOKEN",
    "BackendConfig", "backend_init", "backend_ready", "backend_devices", "cpu_backend_choice",
    "EmbeddingContext", "POOLING_TYPES",
]

if TYPE_CHECKING:
    from appliance.engine.cpuprobe import BackendChoice

log = logging.getLogger("appliance.llama")

# ggml.h: NONE=0 DEBUG=1 INFO=2 WARN=3 ERROR=4 CONT=5 (llama-cpp-python's _logger comment is out of date).
_GGML_LEVELS = {3: logging.WARNING, 4: logging.ERROR}


@dataclass(frozen=True)
class BackendConfig:
    """Which CPU build of llama.cpp to load, passed in by whoever builds the model registry.

    `preference`: a build tag ("haswell") or "auto". In a gunicorn worker the master has already chosen
    and probed one before forking (`preset`, or `preset_error`: why none runs here); elsewhere (tests,
    the bench) the first load chooses. `on_chosen(module, extra_buffers)` records the build once loaded.
    """

    preference: str = "auto"
    preset: BackendChoice | None = None
    preset_error: str | None = None
    on_chosen: Callable[[str, bool], None] | None = None


class _Loaded:
    """What this process's ggml has loaded. ggml's backend registry is itself one per process (a
    module loaded twice would register its devices twice), so this is the one piece of state kept
    per process rather than per registry: the first load decides, later registries see the same."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ready = False
        self.choice: BackendChoice | None = None  # the CPU build in use and why
        self.devices: list[dict[str, Any]] | None = None  # fixed once the backends are loaded


_LOADED = _Loaded()


class _Captured(threading.local):
    """llama.cpp messages this thread is collecting instead of logging (see `Grammar`)."""

    lines: list[str] | None = None


_CAPTURED = _Captured()


def _log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's own diagnostics only (it never logs prompts): warnings and errors reach our log,
    # the chatty INFO/DEBUG stream is dropped.
    py_level = _GGML_LEVELS.get(level)
    if py_level is not None:
        line = text.decode("utf-8", "replace").rstrip()
        captured = _CAPTURED.lines
        if captured is not None:  # a request's own mistake: answered to it, not logged as a server error
            captured.append(line)
        else:
            log.log(py_level, "llama.cpp: %s", line)  # an argument, so the policy bounds its length


_log_callback = C.llama_log_callback(_log)  # the C function pointer llama.cpp calls (kept alive here)


def backend_init(config: BackendConfig | None = None) -> None:
    """Initialise llama.cpp once per process (in the worker, never in the pre-fork master).

    Our libllama is built with ggml's backends as loadable modules (GGML_BACKEND_DL): one CPU module
    per x86 instruction-set level, plus ggml-cuda in the CUDA variant. The CPU module is chosen by
    `cpuprobe.choose_backend`: the best (or pinned) build whose kernels a throw-away child process has
    run on this CPU without dying or computing garbage, else the next one; only that one is loaded
    here. Non-CPU modules (ggml-cuda) load if their driver is there; the CPU always remains.
    """
    config = config or BackendConfig()
    loaded = _LOADED
    with loaded.lock:
        if not loaded.ready:
            C.llama_log_set(_log_callback, ctypes.c_void_p(0))
            lib_dir = _lib_dir()
            if any(lib_dir.glob("libggml-cpu-*.so")):
                from appliance.engine.cpuprobe import choose_backend
                from appliance.settings import default_threads

                if config.preset_error is not None:  # the master found no build that runs here
                    raise RuntimeError(config.preset_error)
                if config.preset is not None:  # chosen (probed) by the gunicorn master
                    choice = config.preset
                else:
                    try:
                        choice = choose_backend(lib_dir, config.preference, n_threads=default_threads())
                    except RuntimeError as e:
                        log.error("llama.cpp: %s", e)
                        raise
                if choice.fell_back:
                    log.warning("llama.cpp CPU backend: %s", choice.reason)
                # The frozen binary: the backend modules about to load are still the ones it was built with.
                verify_bundle("llama_cpp/lib/")
                ggml = _ggml()
                for module in sorted(lib_dir.glob("libggml-*.so")):
                    tag = module.name[len("libggml-") : -len(".so")]
                    if tag == choice.module or not tag.startswith(("cpu", "base")):
                        if not ggml.ggml_backend_load(str(module).encode()) and tag == choice.module:
                            raise RuntimeError(f"llama.cpp's {tag} build passed its probe but did not load")
                if not any(d["type"] == "cpu" for d in _scan_devices()):
                    raise RuntimeError(f"ggml loaded no CPU backend from {lib_dir}")
                loaded.choice = choice
                if config.on_chosen is not None:
                    config.on_chosen(choice.module, choice.extra_buffers)
            C.llama_backend_init()
            loaded.devices = devices = _scan_devices()
            loaded.ready = True
            log.info("llama.cpp backends: %s", ", ".join(f"{d['name']} ({d['module']})" for d in devices))
            if loaded.choice is not None and not loaded.choice.fell_back:
                log.info("llama.cpp CPU backend: %s (%s)", loaded.choice.module, loaded.choice.reason)
            gpu_module = next(iter(sorted(lib_dir.glob("libggml-cuda*.so"))), None)
            if gpu_module is not None and not any(d["type"] == "gpu" for d in devices):
                log.warning("CUDA build without a usable GPU, serving on the CPU: %s", _why_not_loaded(gpu_module))


def cpu_backend_choice() -> BackendChoice | None:
    """The CPU build llama.cpp runs in this process and why, once the backends are loaded."""
    return _LOADED.choice


def _why_not_loaded(module: Path) -> str:
    """Why ggml skipped a backend module: the loader's own error (a missing driver or runtime library)."""
    # dlopen directly: PyInstaller's ctypes hook replaces OSError's text with a guess about freezing.
    libc = ctypes.CDLL(None)
    libc.dlopen.argtypes, libc.dlopen.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    libc.dlerror.argtypes, libc.dlerror.restype = [], ctypes.c_char_p
    if not libc.dlopen(str(module).encode(), 2):  # RTLD_NOW
        err = (libc.dlerror() or b"unknown error").decode("utf-8", "replace")
        return f"{err} (the NVIDIA driver and the CUDA 13 runtime must be on the loader path)"
    return "the CUDA backend loaded but found no GPU"


def backend_ready() -> bool:
    return _LOADED.ready


def _lib_dir() -> Path:
    return Path(C._base_path)


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml: the very object libllama links, or backends would register in a second copy.

    By soname: libllama's DT_NEEDED names libggml.so.0 and dlopen returns the loaded object of that
    name (the wheel holds libggml.so and libggml.so.0 as separate copies, so a path could differ).
    """
    _ = C._lib  # libllama, and with it its libggml, is loaded
    lib = ctypes.CDLL("libggml.so.0")
    lib.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load_all_from_path.restype = None
    lib.ggml_backend_load.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_load.restype = ctypes.c_void_p
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
        getattr(lib, fn).argtypes = [ctypes.c_void_p]
        getattr(lib, fn).restype = ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    return lib


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


@functools.cache
def _gguf() -> ctypes.CDLL:
    """ggml's GGUF reader (libggml-base, which libllama loads): the parser llama.cpp itself uses."""
    _ = C._lib
    lib = ctypes.CDLL("libggml-base.so.0")
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _GgufInitParams]
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_find_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_tensor.restype = ctypes.c_int64
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.gguf_free.restype = None
    return lib


def gguf_tensors_present(path: str | Path, names: Sequence[str]) -> frozenset[str]:
    """Which of `names` are tensors of the GGUF file at `path` (its header only: no tensor data is
    read); none when the file cannot be read as a GGUF."""
    lib = _gguf()
    ctx = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, None))
    if not ctx:
        return frozenset()
    try:
        return frozenset(n for n in names if lib.gguf_find_tensor(ctx, n.encode()) >= 0)
    finally:
        lib.gguf_free(ctx)


_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}




def backend_devices() -> list[dict[str, Any]]:
    """The devices ggml can use, each with the backend module that provides it.

    `module` is the loaded library's variant tag (libggml-cpu-zen4.so -> "cpu-zen4"), or "builtin"
    for a build without loadable backends. Scanned once after loading; /status reads the copy.
    """
    if _LOADED.devices is not None:
        return [dict(d) for d in _LOADED.devices]
    return _scan_devices()


def _scan_devices() -> list[dict[str, Any]]:
    ggml = _ggml()
    modules = _loaded_backend_modules()
    out: list[dict[str, Any]] = []
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = _DEV_TYPES.get(ggml.ggml_backend_dev_type(dev), "other")
        name = (ggml.ggml_backend_dev_name(dev) or b"").decode("utf-8", "replace")
        family = "cpu" if kind == "cpu" else name.rstrip("0123456789").lower()
        module = next((m for m in modules if m == family or m.startswith(family + "-")), "builtin")
        device: dict[str, Any] = {
            "name": name,
            "type": kind,
            "description": (ggml.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace"),
            "module": module,
        }
        if kind == "cpu" and _LOADED.choice is not None:
            device.update(
                extra_buffers=_LOADED.choice.extra_buffers,
                reason=_LOADED.choice.reason,
                probes=[p.to_dict() for p in _LOADED.choice.probes],
            )
        out.append(device)
    return out


def _loaded_backend_modules() -> list[str]:
    """Tags of the ggml backend modules mapped into this process, from /proc/self/maps."""
    found: list[str] = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                name = line.rsplit("/", 1)[-1].strip()
                if name.startswith("libggml-") and name.endswith(".so"):
                    tag = name[len("libggml-") : -len(".so")]
                    if tag != "base" and tag not in found:
                        found.append(tag)
    except OSError:
        pass
    return found


class LlamaModel:
    """A loaded GGUF model: weights, vocabulary and metadata. Thread-safe for reads."""

    def __init__(
        self, path: Path, *, n_gpu_layers: int = 0, use_mmap: bool = True, backend: BackendConfig | None = None
    ) -> None:
        backend_init(backend)
        params = C.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers if n_gpu_layers >= 0 else 0x7FFFFFFF
        # This llama.cpp has load_mode where older ones had use_mmap (a ctypes Structure would take
        # `params.use_mmap = ...` as a plain attribute and silently ignore it).
        params.load_mode = C.LLAMA_LOAD_MODE_MMAP if use_mmap else C.LLAMA_LOAD_MODE_NONE
        # Without AMX / repacked weight buffers when the CPU probe found them unsafe here.
        params.use_extra_bufts = _LOADED.choice.extra_buffers if _LOADED.choice is not None else True
        self._ptr: int | None = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._ptr:
            raise ValueError("llama.cpp could not load the model file")
        self.path = path
        self.vocab = C.llama_model_get_vocab(self._ptr)
        self.n_vocab = C.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = C.llama_model_n_ctx_train(self._ptr)
        self.n_params = C.llama_model_n_params(self._ptr)
        self.size_bytes = C.llama_model_size(self._ptr)
        self.bos = C.llama_vocab_bos(self.vocab)
        self.eos = C.llama_vocab_eos(self.vocab)
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self._read_vocab()
        desc = ctypes.create_string_buffer(256)
        C.llama_model_desc(self._ptr, desc, len(desc))
        self.description = desc.value.decode("utf-8", "replace")
        self.n_embd_out = C.llama_model_n_embd_out(self._ptr)
        self._owners = 1  # see retain()
        self._owners_lock = real_lock()

    @property
    def ptr(self) -> int | None:
        return self._ptr

    def retain(self) -> None:
        """One more owner of these weights (a model's embedding context beside its generation one, each
        on its own thread): close() frees them when the last owner has closed."""
        with self._owners_lock:
            self._owners += 1

    def meta(self, key: str) -> str | None:
        size = C.llama_model_meta_val_str(self._ptr, key.encode(), None, 0)
        if size < 0:
            return None
        buf = ctypes.create_string_buffer(size + 1)
        C.llama_model_meta_val_str(self._ptr, key.encode(), buf, size + 1)
        return buf.value.decode("utf-8", "replace")

    def token_text(self, token: int) -> str:
        raw = C.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if raw else ""

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
            if n < 0:
                raise ValueError("tokenization failed")
        return list(buf[:n])

    def _read_vocab(self) -> None:
        # Every token's bytes and end-of-generation flag, read once here (~0.2 s for a 128k vocab)
        # rather than on first use: the scheduler needs them once per generated token, right after a
        # decode has flushed the CPU caches, where two ctypes calls cost ~60 us against ~1 us for a
        # slice of this table. One bytes blob plus offsets: ~1.5 MB for 128k tokens.
        buf = ctypes.create_string_buffer(256)
        to_piece, is_eog, vocab = C.llama_token_to_piece, C.llama_vocab_is_eog, self.vocab
        pieces: list[bytes] = []
        offsets = array("I", [0])
        eog: list[int] = []
        end = 0
        for token in range(self.n_vocab):
            n = to_piece(vocab, token, buf, len(buf), 0, False)
            if n < 0:  # longer than the buffer: -n is the size it needs
                big = ctypes.create_string_buffer(-n)
                n = to_piece(vocab, token, big, len(big), 0, False)
                piece = big.raw[: max(n, 0)]
            else:
                piece = buf.raw[:n]
            pieces.append(piece)
            end += len(piece)
            offsets.append(end)
            if is_eog(vocab, token):
                eog.append(token)
        self._pieces = b"".join(pieces)
        self._offsets = offsets
        self._eog = frozenset(eog)

    def token_info(self, token: int) -> tuple[bytes, bool]:
        """(the bytes a token adds to the text, whether it ends generation)."""
        if not 0 <= token < self.n_vocab:
            raise ValueError(f"token {token} is not in this model's vocabulary")
        o = self._offsets
        return self._pieces[o[token] : o[token + 1]], token in self._eog

    def piece(self, token: int) -> bytes:
        """The bytes a token adds to the text (control tokens add nothing)."""
        return self.token_info(token)[0]

    def shown_piece(self, token: int) -> bytes:
        """The bytes a token shows as, control tokens spelt out (`<bos>`): llama.cpp's
        common_token_to_piece, which llama-server's /tokenize and /detokenize use. Only control and
        unknown tokens differ from `piece`, so only they cost a call into llama.cpp."""
        piece = self.piece(token)
        if piece:
            return piece
        buf = ctypes.create_string_buffer(256)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        if n < 0:  # longer than the buffer: -n is the size it needs
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)]

    def is_eog(self, token: int) -> bool:
        return self.token_info(token)[1]

    def fim_tokens(self) -> tuple[int, int, int, int, int]:
        """The fill-in-the-middle tokens (prefix, suffix, middle, repo, file separator); -1 where the
        vocabulary has none."""
        v = self.vocab
        return (C.llama_vocab_fim_pre(v), C.llama_vocab_fim_suf(v), C.llama_vocab_fim_mid(v),
                C.llama_vocab_fim_rep(v), C.llama_vocab_fim_sep(v))

    @functools.cached_property
    def silent_tokens(self) -> np.ndarray:
        """Tokens that add no text and do not end generation (control tokens such as `<mask>`).

        llama.cpp's grammar reads every token as its spelt-out text, so a grammar may accept
        `<mask>` inside a JSON string while the text we return shows nothing for it: constrained
        sampling bans these. (An id array, computed once, from the pieces read at load.)"""
        lengths = np.diff(np.frombuffer(self._offsets, dtype=np.uint32))
        silent = np.flatnonzero(lengths == 0).astype(np.int32)
        return silent[~np.isin(silent, np.fromiter(self._eog, dtype=np.int32, count=len(self._eog)))]

    def close(self) -> None:
        with self._owners_lock:
            self._owners -= 1
            if self._ptr and self._owners <= 0:
                C.llama_model_free(self._ptr)
                self._ptr = None


_FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


if TYPE_CHECKING:
    SeqState = ctypes.Array[ctypes.c_uint8]
    """A sequence's KV cells as llama_state_seq_get_data wrote them."""


def _own_pages(size: int) -> SeqState:
    """`size` zeroed bytes in an anonymous mapping of their own, given back to the kernel whole when the
    last reference goes. Copies of KV cells are megabytes each, of ever-different sizes, and the
    host cache keeps replacing them: from malloc they would come from the heap (glibc raises its mmap
    threshold to the size of the first large block freed), where the holes they leave are never
    returned, and the worker's RSS crept up while the cache filled (issue 21's soak)."""
    pages = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return (ctypes.c_uint8 * size).from_buffer(pages)  # the array holds the mapping alive


class LlamaContext:
    """One llama_context with `n_seq` sequences, each with its own KV stream of `n_ctx_seq` cells."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_ctx_seq: int,
        n_seq: int,
        n_batch: int,
        n_threads: int,
        n_threads_batch: int,
        flash_attn: str = "auto",
    ) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = n_ctx_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        # A split cache gives each slot a fixed share: one long request cannot starve the others,
        # and attention never mixes sequences, so a seeded request decodes alike whatever runs beside it.
        params.kv_unified = False
        params.no_perf = True
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        self._ptr: int | None = C.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise ValueError("llama.cpp could not create a context (out of memory?)")
        self.model = model
        self.memory = C.llama_get_memory(self._ptr)
        self.n_ctx_seq = C.llama_n_ctx_seq(self._ptr)
        self.n_batch = C.llama_n_batch(self._ptr)
        self._threads = (n_threads, n_threads_batch)

    @property
    def ptr(self) -> int | None:
        return self._ptr

    def set_threads(self, n_threads: int, n_threads_batch: int) -> None:
        if (n_threads, n_threads_batch) != self._threads:
            C.llama_set_n_threads(self._ptr, n_threads, n_threads_batch)
            self._threads = (n_threads, n_threads_batch)

    def decode(self, batch: Batch) -> int:
        rc: int = C.llama_decode(self._ptr, batch.struct)
        return rc

    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(C.llama_memory_seq_rm(self.memory, seq, p0, p1))

    def seq_cp(self, src: int, dst: int) -> None:
        """Copy sequence src's whole KV stream over dst's (a split cache copies the buffer at the next decode)."""
        C.llama_memory_seq_cp(self.memory, src, dst, -1, -1)

    def seq_state(self, seq: int) -> SeqState | None:
        """A copy of sequence `seq`'s KV cells (llama_state_seq_get_data), or None when llama.cpp
        could not write it. Reads the buffers now: never call it while a seq_cp into `seq` waits for
        the next decode (the copy would be missing)."""
        size = int(C.llama_state_seq_get_size(self._ptr, seq))
        if size <= 0:
            return None
        buf = _own_pages(size)
        written = int(C.llama_state_seq_get_data(self._ptr, buf, size, seq))
        return buf if written == size else None

    def set_seq_state(self, seq: int, data: SeqState) -> bool:
        """Replace sequence `seq`'s KV cells with a copy made by seq_state (any sequence's, this
        context's model and cache types). False, with `seq` left empty, when it does not fit. The
        buffers are written now: never call it while a seq_cp into `seq` waits for the next decode."""
        if int(C.llama_state_seq_set_data(self._ptr, data, len(data), seq)) == 0:
            self.seq_rm(seq, -1, -1)
            return False
        return True

    def logits(self, i: int) -> np.ndarray:
        ptr = C.llama_get_logits_ith(self._ptr, i)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def close(self) -> None:
        if self._ptr:
            C.llama_free(self._ptr)
            self._ptr = None


POOLING_TYPES = {"none": C.LLAMA_POOLING_TYPE_NONE, "mean": C.LLAMA_POOLING_TYPE_MEAN,
                 "cls": C.LLAMA_POOLING_TYPE_CLS, "last": C.LLAMA_POOLING_TYPE_LAST, "rank": C.LLAMA_POOLING_TYPE_RANK}
"""llama.cpp's pooling types by the names its GGUF key and llama-server's --pooling use."""


class EmbeddingContext:
    """A llama_context that pools each sequence's hidden states into one vector (embeddings = true).

    One unified KV stream of `n_tokens` cells (a non-causal model has none), cleared after every
    decode: sequences never outlive the decode that computes them, and a decode holds at most
    `n_tokens` tokens in one ubatch, since llama.cpp pools a sequence over the ubatch it lies in.
    """

    def __init__(
        self, model: LlamaModel, *, n_tokens: int, n_seq: int, pooling: str, n_threads: int, n_threads_batch: int,
        flash_attn: str = "auto",
    ) -> None:
        params = C.llama_context_default_params()
        params.n_ctx = n_tokens
        params.n_batch = n_tokens
        params.n_ubatch = n_tokens
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads_batch
        params.embeddings = True
        params.pooling_type = POOLING_TYPES[pooling]
        # One stream: llama.cpp splits a batch for a split cache into equal-length pieces per sequence,
        # which would cut a sequence across ubatches; a unified one keeps the batch whole.
        params.kv_unified = True
        params.no_perf = True
        params.flash_attn_type = _FLASH_ATTN[flash_attn]
        self._ptr: int | None = C.llama_init_from_model(model.ptr, params)
        if not self._ptr:
            raise ValueError("llama.cpp could not create an embedding context (out of memory?)")
        self.model = model
        self.memory = C.llama_get_memory(self._ptr)
        self.n_tokens = min(C.llama_n_ubatch(self._ptr), C.llama_n_batch(self._ptr))
        self.pooling = int(C.llama_pooling_type(self._ptr))
        self.n_out = C.llama_model_n_cls_out(model.ptr) if self.pooling == C.LLAMA_POOLING_TYPE_RANK else model.n_embd_out

    def decode(self, batch: Batch) -> int:
        rc: int = C.llama_decode(self._ptr, batch.struct)
        return rc

    def pooled(self, seq: int) -> np.ndarray | None:
        """A copy of sequence `seq`'s pooled vector from the last decode (float32), None if llama.cpp has none."""
        ptr = C.llama_get_embeddings_seq(self._ptr, seq)
        if not ptr:
            return None
        return np.ctypeslib.as_array(ptr, shape=(self.n_out,)).copy()

    def clear(self) -> None:
        if self.memory:
            C.llama_memory_clear(self.memory, False)

    def close(self) -> None:
        if self._ptr:
            C.llama_free(self._ptr)
            self._ptr = None


class Batch:
    """A llama_batch whose arrays are numpy buffers we own, filled with slice assignments."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        seq_ptr_t = ctypes.POINTER(C.llama_seq_id)
        base = self.seq.ctypes.data
        self._seq_ptrs = (seq_ptr_t * capacity)(
            *[ctypes.cast(base + 4 * i, seq_ptr_t) for i in range(capacity)]
        )
        # llama_cpp annotates llama_batch's pointer fields as arrays; the C struct holds pointers.
        self.struct = C.llama_batch()
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(C.llama_token))  # type: ignore[assignment]
        self.struct.embd = None  # type: ignore[assignment]
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(C.llama_pos))  # type: ignore[assignment]
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))  # type: ignore[assignment]
        self.struct.seq_id = self._seq_ptrs  # type: ignore[assignment]
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))  # type: ignore[assignment]
        self.n = 0
        # Plain memoryviews over the same buffers, for add_one: a numpy slice assignment touches far
        # more code, which runs cache-cold right after a decode has streamed the weights through.
        # (ndarray.data: the array's buffer as a memoryview, what memoryview(array) gives.)
        self._token_mv = self.token.data.cast("B").cast("i")
        self._pos_mv = self.pos.data.cast("B").cast("i")
        self._seq_mv = self.seq.data.cast("B").cast("i")
        self._logits_mv = self.logits.data.cast("B").cast("b")

    def clear(self) -> None:
        self.n = 0

    def add_one(self, token: int, pos: int, seq: int) -> int:
        """Append one token that wants logits (a generating sequence's next token); its batch index."""
        i = self.n
        self._token_mv[i] = token
        self._pos_mv[i] = pos
        self._seq_mv[i] = seq
        self._logits_mv[i] = 1
        self.n = i + 1
        self.struct.n_tokens = i + 1
        return i

    def add(self, tokens: Sequence[int], start_pos: int, seq: int, want_last_logits: bool, *,
            all_logits: bool = False) -> int:
        """Append tokens of one sequence; returns the batch index of the last one. Logits are computed
        for the last token (want_last_logits), or for every one (all_logits: a draft to verify)."""
        k = len(tokens)
        a, b = self.n, self.n + k
        self.token[a:b] = tokens
        self.pos[a:b] = np.arange(start_pos, start_pos + k, dtype=np.int32)
        self.seq[a:b] = seq
        self.logits[a:b] = 1 if all_logits else 0
        if want_last_logits:
            self.logits[b - 1] = 1
        self.n = b
        self.struct.n_tokens = b
        return b - 1


class Grammar:
    """A GBNF grammar compiled for one model's vocabulary (llama.cpp's grammar sampler, root rule
    `root`): the prototype that a constrained sequence's sampler chain copies when it is admitted.

    Compile it off the event loop (parsing is C++ work proportional to the grammar). Freed when
    dropped; a copy taken by a sampler chain lives on with that chain.
    """

    def __init__(self, model: LlamaModel, gbnf: str) -> None:
        """ValueError (with llama.cpp's reason where it gives one) if llama.cpp refuses the grammar.

        llama.cpp's own parser prints the whole grammar to stderr when it cannot parse it: check
        the syntax first (`appliance.engine.grammar.check_gbnf`), so only the refusals it alone can
        make (left recursion, a `<token>` that is not one token) reach it.
        """
        self._ptr: Any = None
        lines: list[str] = []
        _CAPTURED.lines = lines
        try:
            ptr = C.llama_sampler_init_grammar(model.vocab, gbnf.encode("utf-8"), b"root")
        finally:
            _CAPTURED.lines = None
        if not ptr:
            reasons = [line for line in lines if line and line != "failed to parse grammar"]
            raise ValueError("; ".join(reasons) or "llama.cpp could not parse it")
        self._ptr = ptr

    @property
    def ptr(self) -> Any:
        return self._ptr

    def close(self) -> None:
        if self._ptr:
            C.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.close()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias added to its logit) pairs; ids must be within the vocabulary."""
    grammar: Grammar | None = None
    """Constrains every sampled token, greedy included (see SamplerChain)."""

    @classmethod
    def with_overrides(cls, **values: object) -> SamplingParams:
        """These defaults, with every value given that is not None (a request's unset fields)."""
        given: dict[str, Any] = {k: v for k, v in values.items() if v is not None}
        return dataclasses.replace(cls(), **given)


NO_TOKEN = -1
"""What SamplerChain.sample returns when its grammar allows no token of the vocabulary."""


class SamplerChain:
    """A per-sequence sampler chain, in llama.cpp's usual order (logit bias, penalties, top-k, top-p,
    min-p, temp), with a grammar in front when the request constrains its output.

    A grammar is applied as llama.cpp's common sampler does it: sample with the chain alone, then
    check that one token against the grammar; only when it is refused, run the grammar over the
    whole vocabulary (tens of ms for a 256k vocabulary) and sample again from what it allows.
    Drawing then rejecting this way gives the same distribution as filtering first, and a model
    that follows the format (most tokens, in practice) skips the full pass.
    """

    def __init__(self, model: LlamaModel, p: SamplingParams) -> None:
        self._ptr = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self._grammar: Any = None
        self._argmax = (p.temperature <= 0 and not p.logit_bias and p.grammar is None
                        and p.repeat_penalty == 1.0 and not p.presence_penalty and not p.frequency_penalty)
        """Plain greedy: the chain is llama.cpp's greedy sampler alone, which keeps no state and picks
        the first highest logit, as numpy's argmax does; read straight from the logits, without
        llama_sampler_sample's copy of the whole vocabulary into candidates (262k for Gemma: 0.28 ms a
        token against 0.02 ms, measured on this 2-vCPU machine)."""

        def add(s: Any) -> None:
            C.llama_sampler_chain_add(self._ptr, s)

        if p.logit_bias:
            biases = (C.llama_logit_bias * len(p.logit_bias))(*(C.llama_logit_bias(t, b) for t, b in p.logit_bias))
            add(C.llama_sampler_init_logit_bias(model.n_vocab, len(p.logit_bias), biases))
        if p.repeat_penalty != 1.0 or p.presence_penalty or p.frequency_penalty:
            add(
                C.llama_sampler_init_penalties(
                    model.n_vocab, p.repeat_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
                )
            )
        if p.temperature <= 0:
            add(C.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                add(C.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                add(C.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0.0:
                add(C.llama_sampler_init_min_p(p.min_p, 1))
            add(C.llama_sampler_init_temp(p.temperature))
            add(C.llama_sampler_init_dist(p.seed))
        if p.grammar is not None:
            self._grammar = C.llama_sampler_clone(p.grammar.ptr)  # this sequence's own grammar state
            n = model.n_vocab
            # The candidates, as llama_token_data (id, logit, p) rows viewed as float32 triples; a
            # pristine copy with the ids in place is copied over them before each pass.
            self._rows = np.zeros((n, 3), dtype=np.float32)
            self._fresh = np.zeros((n, 3), dtype=np.float32)
            self._fresh[:, 0] = np.arange(n, dtype=np.int32).view(np.float32)
            self._silent = model.silent_tokens
            self._silent_set = frozenset(int(t) for t in self._silent)
            data = self._rows.ctypes.data_as(C.llama_token_data_p)
            self._cur = C.llama_token_data_array(data, n, -1, False)
            self._one = (C.llama_token_data * 1)()
            self._one_cur = C.llama_token_data_array(ctypes.cast(self._one, C.llama_token_data_p), 1, -1, False)

    @property
    def constrained(self) -> bool:
        return self._grammar is not None

    def sample(self, ctx: LlamaContext, i: int) -> int:
        """The next token (accepted into the chain), or NO_TOKEN when a grammar allows none."""
        if self._argmax:
            return int(np.argmax(ctx.logits(i)))
        if self._grammar is None:
            # llama_sampler_sample also accepts the token into the chain (penalty history).
            token: int = C.llama_sampler_sample(self._ptr, ctx.ptr, i)
            return token
        logits = ctx.logits(i)
        token = self._draw(logits, grammar_first=False)
        if not self._allows(token):
            token = self._draw(logits, grammar_first=True)
            if token == NO_TOKEN:
                return NO_TOKEN
        C.llama_sampler_accept(self._grammar, token)
        C.llama_sampler_accept(self._ptr, token)
        return token

    def _draw(self, logits: np.ndarray, *, grammar_first: bool) -> int:
        """Apply the chain (after the grammar, if grammar_first) to fresh candidates; the token chosen."""
        rows, cur = self._rows, self._cur
        np.copyto(rows, self._fresh)
        rows[:, 1] = logits
        # Samplers shrink, reorder and mark the candidates in place: start each pass afresh.
        cur.data = rows.ctypes.data_as(C.llama_token_data_p)  # type: ignore[assignment]
        cur.size, cur.selected, cur.sorted = len(rows), -1, False
        best = NO_TOKEN
        if grammar_first:
            rows[self._silent, 1] = -np.inf
            C.llama_sampler_apply(self._grammar, ctypes.byref(cur))
            allowed = np.flatnonzero(np.isfinite(rows[:, 1]))  # the grammar only masks: ids stay in place
            if not allowed.size:
                return NO_TOKEN
            best = int(allowed[np.argmax(rows[allowed, 1])])
        C.llama_sampler_apply(self._ptr, ctypes.byref(cur))
        chosen = cur.data[cur.selected]
        if grammar_first and not np.isfinite(chosen.logit):
            # The distribution sampler can land on a zero-probability candidate when its draw is
            # exactly 0; the grammar's best allowed token stands in for it.
            return best
        return int(chosen.id)

    def _allows(self, token: int) -> bool:
        """Whether the grammar accepts `token` next (and it is not a silent control token)."""
        if token in self._silent_set:
            return False
        self._one[0] = C.llama_token_data(token, 1.0, 0.0)
        self._one_cur.size, self._one_cur.selected, self._one_cur.sorted = 1, -1, False
        C.llama_sampler_apply(self._grammar, ctypes.byref(self._one_cur))
        return bool(np.isfinite(self._one[0].logit))

    def close(self) -> None:
        if self._ptr:
            C.llama_sampler_free(self._ptr)
            self._ptr = None
        if self._grammar:
            C.llama_sampler_free(self._grammar)
            self._grammar = None
