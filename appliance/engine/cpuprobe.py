"""Prove that a CPU backend build of llama.cpp runs on this CPU before any model is served by it.

ggml picks its CPU module by CPUID alone. On Intel Xeons with AMX (the CPUs TDX runs on) the module it
picks, `sapphirerapids`, has killed whole processes with SIGILL on its first quantized matrix product
(README "Runtime CPU dispatch"). A signal in llama.cpp cannot be caught in-process, so each candidate
is tried first in a throw-away child process (a plain fork: no exec, no second interpreter start):
the child loads the module and multiplies a small matrix of every weight type the module has kernels
for, through every weight buffer llama.cpp would use for it (the AMX and repacked "extra" buffers as
well as plain memory), with several activation rows, since AMX is only taken for more than one row.
It checks the products against the float result too. If the child dies, hangs or computes garbage,
the same module is tried without its extra buffers (llama.cpp's `use_extra_bufts = false`: plain
AVX-512 kernels, no AMX, no repacking), then the next best module; the first that passes is loaded.

This module holds no llama.cpp state of its own: the child does all the loading, so the caller's
process has loaded nothing when the choice is made. The server makes the choice in the gunicorn master
(single-threaded, before it forks a worker; forking a worker busy with threads can deadlock the child)
and hands it to the worker; a process without that master (tests, the bench) makes it in backend_init.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = ["BackendChoice", "ProbeResult", "choose_backend", "llama_lib_dir", "rank_modules", "probe_module", "KERNEL_TYPES"]

# ggml_type ids (ggml.h) of the weight types llama.cpp's CPU kernels are tried on: every type a
# current GGUF uses for its big matrices, which covers each family of kernels (legacy blocks, k-quants,
# non-linear, float) and every type the AMX and repack buffers take.
KERNEL_TYPES: dict[str, int] = {
    "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "q2_k": 10, "q3_k": 11,
    "q4_k": 12, "q5_k": 13, "q6_k": 14, "iq4_nl": 20, "iq4_xs": 23, "bf16": 30,
}
# One weight matrix of N x K, multiplied by M activation rows for each M. K is a multiple of every
# block size (QK_K = 256) and N of the AMX tile width (32); M = 1 takes the matrix-vector path,
# M > 1 the tiled GEMM (AMX, llamafile), 33 a full tile block plus a remainder.
_K, _N, _ROWS = 256, 64, (1, 5, 33)
# Below this cosine similarity to the float product, a kernel computed garbage (4-bit weights reach
# ~0.99 on these random matrices; a wrong kernel gives ~0).
_MIN_COSINE = 0.9
PROBE_TIMEOUT = 60.0


@dataclass(frozen=True)
class ProbeResult:
    module: str  # "cpu-zen4"
    extra_buffers: bool
    ok: bool
    detail: str  # what ran, or how it failed: "killed by SIGILL", "q4_k through AMX: cosine 0.01"
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BackendChoice:
    """The CPU build that runs, and why: what /status devices and the attestation claims report."""

    module: str  # "cpu-zen4"
    extra_buffers: bool  # llama.cpp's AMX / repacked weight buffers in use
    reason: str
    probes: tuple[ProbeResult, ...] = field(default=())

    @property
    def fell_back(self) -> bool:
        return any(not p.ok for p in self.probes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "extra_buffers": self.extra_buffers,
            "reason": self.reason,
            "probes": [p.to_dict() for p in self.probes],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackendChoice:
        return cls(d["module"], d["extra_buffers"], d["reason"], tuple(ProbeResult(**p) for p in d["probes"]))


def llama_lib_dir() -> Path | None:
    """llama_cpp/lib, found without importing llama_cpp (which loads libllama): the gunicorn master
    chooses the CPU build without loading llama.cpp itself."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    lib = Path(spec.submodule_search_locations[0]) / "lib"
    return lib if any(lib.glob("libggml-cpu-*.so")) else None


# ---------------------------------------------------------------------------------------------
# Choosing


def choose_backend(
    lib_dir: Path,
    preference: str = "auto",
    *,
    n_threads: int = 1,
    probe: Callable[[Path, str, bool, int], ProbeResult] | None = None,
    rank: Callable[[Path], list[tuple[str, int]]] | None = None,
    refused: dict[tuple[str, bool], str] | None = None,
) -> BackendChoice:
    """The best CPU build whose probe passes: the preferred one (ggml's own ranking, or a pinned level),
    then the same without extra buffers, then each lower-ranked build in turn. `refused`: (build, extra
    buffers) that killed an earlier worker while serving, and how: skipped, whatever a probe says.

    Raises RuntimeError when no build passes (or none fits this CPU).
    """
    refused = refused or {}
    probe = probe or probe_module
    ranked = (rank or rank_modules)(lib_dir)
    if not ranked:
        raise RuntimeError(f"ggml has no CPU backend build in {lib_dir} that fits this CPU")
    order = [tag for tag, _ in ranked]
    if preference != "auto":
        wanted = f"cpu-{preference}"
        if wanted not in order:
            raise RuntimeError(f"this CPU cannot run llama.cpp's {wanted} build")
        order.remove(wanted)
        order.insert(0, wanted)
    results: list[ProbeResult] = []
    for tag in order:
        for extra in (True, False):
            why = refused.get((tag, extra))
            result = (ProbeResult(tag, extra, False, f"not tried: it {why} while serving", 0.0) if why
                      else probe(lib_dir, tag, extra, n_threads))
            results.append(result)
            if result.ok:
                return BackendChoice(tag, extra, _reason(preference, order[0], results), tuple(results))
    failures = "; ".join(f"{r.module}{'' if r.extra_buffers else ' (no extra buffers)'}: {r.detail}" for r in results)
    raise RuntimeError(f"no CPU backend build of llama.cpp passed its probe on this CPU: {failures}")


def _reason(preference: str, first: str, results: list[ProbeResult]) -> str:
    chosen = results[-1]
    why = "the pinned build (server.cpu_backend)" if preference != "auto" else "the best build for this CPU"
    if len(results) == 1:
        return f"{why}; its probe passed"
    failed = [r for r in results if not r.ok]
    said = "; ".join(f"{r.module}{'' if r.extra_buffers else ' without extra buffers'} {r.detail}" for r in failed)
    what = chosen.module + ("" if chosen.extra_buffers else " without extra buffers (no AMX, no repacking)")
    return f"fallback: {first} was {why} but its probe failed ({said}); using {what}"


# ---------------------------------------------------------------------------------------------
# Child processes


def rank_modules(lib_dir: Path) -> list[tuple[str, int]]:
    """The CPU builds this CPU can run, best first, by each module's own ggml_backend_score.

    Scored in a child: dlopen runs each module's initialisers, and this process loads only the one chosen.
    """
    status, payload = run_in_child(_rank_in_child, str(lib_dir), timeout=PROBE_TIMEOUT)
    if status != "ok":
        raise RuntimeError(f"scoring llama.cpp's CPU builds failed: {status}")
    return [(tag, score) for tag, score in payload]


def probe_module(lib_dir: Path, tag: str, extra_buffers: bool, n_threads: int) -> ProbeResult:
    t0 = time.monotonic()
    status, payload = run_in_child(_probe_in_child, str(lib_dir), tag, extra_buffers, n_threads, timeout=PROBE_TIMEOUT)
    seconds = round(time.monotonic() - t0, 3)
    if status != "ok":
        return ProbeResult(tag, extra_buffers, False, status, seconds)
    return ProbeResult(tag, extra_buffers, bool(payload["ok"]), str(payload["detail"]), seconds)


def run_in_child(fn: Callable[..., object], *args: object, timeout: float) -> tuple[str, Any]:
    """Run fn(*args) in a forked child and return ("ok", its JSON-able result), or a failure.

    The failure says how the child ended: "killed by SIGILL", "exited with 3", "timed out after 60 s".
    Blocking: call it from a real OS thread, never from the event loop. The child only runs fn and
    writes one JSON document to a pipe; it never returns into the caller's code.
    """
    # SIGCHLD held until this child is reaped: a handler that reaps every child (gunicorn's master
    # reaps with waitpid(-1)) would take its exit status. Delivered afterwards, it finds nothing of ours.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        return _run_in_child(fn, args, timeout)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _run_in_child(fn: Callable[..., object], args: tuple[object, ...], timeout: float) -> tuple[str, Any]:
    fork, waitpid, select = _originals()
    r, w = os.pipe()
    pid = fork()
    if pid == 0:  # child
        code = 70
        try:
            os.close(r)
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            _quiet_child()
            data = json.dumps(fn(*args)).encode()
            while data:
                data = data[os.write(w, data) :]
            code = 0
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    timed_out = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready, _, _ = select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
    if timed_out:
        os.kill(pid, signal.SIGKILL)
    try:
        _, status = waitpid(pid, 0)
    except ChildProcessError:  # reaped by another thread's handler: only its output can tell
        status = None
    if timed_out:
        return f"timed out after {timeout:g} s", None
    if status is None:
        try:
            return "ok", json.loads(b"".join(chunks))
        except ValueError:
            return "ended without a result (its exit status was reaped elsewhere)", None
    if os.WIFSIGNALED(status):
        return f"killed by {_signal_name(os.WTERMSIG(status))}", None
    code = os.WEXITSTATUS(status)
    if code != 0:
        return f"exited with {code}", None
    try:
        return "ok", json.loads(b"".join(chunks))
    except ValueError:
        return "sent no result", None


def _quiet_child() -> None:
    """ggml's chatter (loading, repacking) is not the server's log; the parent reports the outcome.
    Python's fault handler is off too, so a signal ends the child at once, as it would llama.cpp."""
    import faulthandler

    faulthandler.disable()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    os.close(devnull)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _originals() -> tuple[
    Callable[[], int],
    Callable[[int, int], tuple[int, int]],
    Callable[[list[int], list[int], list[int], float | None], tuple[list[int], list[int], list[int]]],
]:
    """fork, waitpid and select as the OS has them, also in a worker gevent has monkey-patched
    (gevent's fork would re-initialise the event loop in the child; its select would wait on a hub)."""
    from appliance import osthreads

    return osthreads.fork, osthreads.waitpid, osthreads.select_fds


# ---------------------------------------------------------------------------------------------
# What the children run (never in the serving process)


def _rank_in_child(lib_dir: str) -> list[list[Any]]:
    import llama_cpp.llama_cpp as C

    _ = C._lib  # the modules need the libggml-base that libllama brings in
    scored: list[list[Any]] = []
    for module in sorted(Path(lib_dir).glob("libggml-cpu-*.so")):
        try:
            lib = ctypes.CDLL(str(module))
        except OSError:
            continue
        score_fn = getattr(lib, "ggml_backend_score", None)
        if score_fn is None:
            continue
        score_fn.restype = ctypes.c_int
        score = int(score_fn())
        if score > 0:
            scored.append([module.name[len("libggml-") : -len(".so")], score])
    scored.sort(key=lambda item: -item[1])
    return scored


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _bind(lib: ctypes.CDLL) -> None:
    vp, sz, i64 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64
    sigs = {
        "ggml_backend_load": ([ctypes.c_char_p], vp),
        "ggml_backend_reg_dev_get": ([vp, sz], vp),
        "ggml_backend_reg_get_proc_address": ([vp, ctypes.c_char_p], vp),
        "ggml_backend_dev_init": ([vp, ctypes.c_char_p], vp),
        "ggml_backend_dev_buffer_type": ([vp], vp),
        "ggml_backend_dev_supports_op": ([vp, vp], ctypes.c_bool),
        "ggml_backend_buft_name": ([vp], ctypes.c_char_p),
        "ggml_backend_alloc_ctx_tensors_from_buft": ([vp, vp], vp),
        "ggml_backend_tensor_set": ([vp, vp, sz, sz], None),
        "ggml_backend_graph_compute": ([vp, vp], ctypes.c_int),
        "ggml_backend_buffer_free": ([vp], None),
        "ggml_backend_free": ([vp], None),
        "ggml_init": ([_InitParams], vp),
        "ggml_free": ([vp], None),
        "ggml_tensor_overhead": ([], sz),
        "ggml_graph_overhead": ([], sz),
        "ggml_new_tensor_2d": ([vp, ctypes.c_int, i64, i64], vp),
        "ggml_mul_mat": ([vp, vp, vp], vp),
        "ggml_new_graph": ([vp], vp),
        "ggml_build_forward_expand": ([vp, vp], None),
        "ggml_get_data": ([vp], vp),
        "ggml_row_size": ([ctypes.c_int, i64], sz),
        "ggml_quantize_chunk": ([ctypes.c_int, vp, vp, i64, i64, i64, vp], sz),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res


# Fault injection for tests of the whole fallback path in a real server: the probe child of this
# module (with its extra buffers) kills itself with SIGILL, as the AMX kernels did. At worst it makes
# an appliance fall back to plainer kernels, and the claims then say `fallback: true`.
FAULT_ENV = "APPLIANCE_FAULT_CPU_PROBE"


def _probe_in_child(lib_dir: str, tag: str, extra_buffers: bool, n_threads: int) -> dict[str, Any]:
    import numpy as np

    if extra_buffers and tag in os.environ.get(FAULT_ENV, "").split(","):
        os.kill(os.getpid(), signal.SIGILL)

    import llama_cpp.llama_cpp as C

    _ = C._lib  # libllama and, with it, the libggml it links
    ggml = ctypes.CDLL("libggml.so.0")
    _bind(ggml)
    reg = ggml.ggml_backend_load(str(Path(lib_dir) / f"libggml-{tag}.so").encode())
    if not reg:
        return {"ok": False, "detail": "the module did not load"}
    dev = ggml.ggml_backend_reg_dev_get(reg, 0)
    backend = ggml.ggml_backend_dev_init(dev, None)
    set_threads = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    if set_threads:
        ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int)(set_threads)(backend, max(1, n_threads))
    bufts = [("plain", ggml.ggml_backend_dev_buffer_type(dev))]
    if extra_buffers:
        get_extra = ggml.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if get_extra:
            arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(get_extra)(dev)
            i = 0
            while arr and arr[i]:
                bufts.append((ggml.ggml_backend_buft_name(arr[i]).decode(), arr[i]))
                i += 1

    rng = np.random.default_rng(1234)
    weights = rng.standard_normal((_N, _K), dtype=np.float32)
    products = 0
    for type_name, type_id in KERNEL_TYPES.items():
        packed = _quantize(ggml, type_id, weights)
        for rows in _ROWS:
            x = rng.standard_normal((rows, _K), dtype=np.float32)
            expected = x @ weights.T
            for buft_name, buft in bufts:
                got = _matmul(ggml, backend, dev, buft, buft_name != "plain", type_id, packed, x)
                if got is None:
                    continue  # an extra buffer that does not take this type or shape (llama.cpp skips it too)
                cos = float((got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected) + 1e-30))
                if not np.isfinite(got).all() or cos < _MIN_COSINE:
                    return {"ok": False, "detail": f"wrong result: {type_name} x {rows} rows through {buft_name}, cosine {cos:.3f}"}
                products += 1
    ggml.ggml_backend_free(backend)
    via = ", ".join(name for name, _ in bufts)
    return {"ok": True, "detail": f"{products} products of {len(KERNEL_TYPES)} weight types through {via}"}


def _quantize(ggml: ctypes.CDLL, type_id: int, weights: NDArray[np.float32]) -> bytes:
    import numpy as np

    src = np.ascontiguousarray(weights, dtype=np.float32)
    row = ggml.ggml_row_size(type_id, _K)
    dst = ctypes.create_string_buffer(row * _N)
    ggml.ggml_quantize_chunk(type_id, src.ctypes.data, dst, 0, _N, _K, None)
    return dst.raw


def _matmul(
    ggml: ctypes.CDLL, backend: int, dev: int, buft: int, extra: bool, type_id: int, packed: bytes, x: NDArray[np.float32]
) -> NDArray[np.float32] | None:
    """x @ W.T with W held in `buft` (None if that buffer does not take W for this product)."""
    import numpy as np

    rows = x.shape[0]
    wctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead() * 2, None, True))
    cctx = ggml.ggml_init(_InitParams(ggml.ggml_tensor_overhead() * 4 + ggml.ggml_graph_overhead() + (rows * (_K + _N) * 4) + 4096, None, False))
    buf = None
    try:
        w = ggml.ggml_new_tensor_2d(wctx, type_id, _K, _N)
        buf = ggml.ggml_backend_alloc_ctx_tensors_from_buft(wctx, buft)
        if not buf:
            return None
        xt = ggml.ggml_new_tensor_2d(cctx, 0, _K, rows)  # F32
        out = ggml.ggml_mul_mat(cctx, w, xt)
        if extra and not ggml.ggml_backend_dev_supports_op(dev, out):
            return None
        ggml.ggml_backend_tensor_set(w, packed, 0, len(packed))
        ctypes.memmove(ggml.ggml_get_data(xt), np.ascontiguousarray(x).ctypes.data, x.nbytes)
        graph = ggml.ggml_new_graph(cctx)
        ggml.ggml_build_forward_expand(graph, out)
        if ggml.ggml_backend_graph_compute(backend, graph) != 0:
            raise RuntimeError("graph compute failed")
        result = np.empty((rows, _N), dtype=np.float32)
        ctypes.memmove(result.ctypes.data, ggml.ggml_get_data(out), result.nbytes)
        return result
    finally:
        if buf:
            ggml.ggml_backend_buffer_free(buf)
        ggml.ggml_free(cctx)
        ggml.ggml_free(wctx)
