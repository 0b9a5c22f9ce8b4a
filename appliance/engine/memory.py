"""Will a context fit? The KV cache a context needs, against the memory this process may still use.

llama.cpp allocates the whole KV cache when a context is created and clears it, touching every page:
a context larger than the memory left is not refused by malloc (Linux overcommits) but killed by the
OOM killer halfway through the clear, taking the worker and every model in it down. So the engine
refuses such a load up front, with the numbers, instead.

The estimate is an upper bound: every layer holds `n_ctx` cells for each sequence, keys and values in
F16 (llama.cpp's default cache type). Models with sliding-window layers (Gemma 3) keep fewer cells in
those layers, so they fit in less than the estimate says; the bound errs on the side of refusing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as C

from appliance.engine.errors import LoadRefused

__all__ = ["KvEstimate", "available_bytes", "check_fits", "kv_estimate", "trim_heap"]

log = logging.getLogger("appliance.server")

F16_BYTES = 2
HEADROOM_BYTES = 256 << 20
"""Left over after the KV cache, for the compute buffers, the logits and the worker itself."""
GIB = float(1 << 30)


@dataclass(frozen=True)
class KvEstimate:
    n_layer: int
    k_width: int  # key elements per cell per layer (key_length x KV heads)
    v_width: int
    cells: int  # n_ctx x sequences

    @property
    def bytes(self) -> int:
        return self.n_layer * (self.k_width + self.v_width) * F16_BYTES * self.cells


def kv_estimate(model_ptr: int | None, meta: Callable[[str], str | None], *, n_ctx_seq: int, n_seq: int) -> KvEstimate:
    """The most KV cache a context of `n_seq` sequences of `n_ctx_seq` cells can take for this model."""
    n_layer = int(C.llama_model_n_layer(model_ptr))
    n_head = max(1, int(C.llama_model_n_head(model_ptr)))
    n_head_kv = max(1, int(C.llama_model_n_head_kv(model_ptr)))
    n_embd = int(C.llama_model_n_embd(model_ptr))
    arch = meta("general.architecture") or ""
    k_len = _int(meta(f"{arch}.attention.key_length")) or n_embd // n_head
    v_len = _int(meta(f"{arch}.attention.value_length")) or k_len
    return KvEstimate(n_layer, k_len * n_head_kv, v_len * n_head_kv, n_ctx_seq * n_seq)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def available_bytes(root: Path = Path("/")) -> int | None:
    """What this process may still allocate: MemAvailable, or less where a cgroup (v2) limit is nearer.
    None when neither can be read (then nothing is refused)."""
    found: list[int] = []
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    cgroup = _own_cgroup(root)
    if cgroup is not None:
        try:
            limit = (cgroup / "memory.max").read_text().strip()
            if limit != "max":
                used = int((cgroup / "memory.current").read_text().strip())
                found.append(max(0, int(limit) - used))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def _own_cgroup(root: Path) -> Path | None:
    try:
        for line in (root / "proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return root / "sys/fs/cgroup" / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def check_fits(
    name: str, estimate: KvEstimate, *, n_ctx_seq: int, n_seq: int, host_cache_bytes: int = 0,
    available: Callable[[], int | None] = available_bytes,
) -> None:
    """Raise LoadRefused (subject n_ctx) when the KV cache, and `host_cache_bytes` more (the host memory
    its cells may be copied out into, cache_ram_mib, and an embedding context's cache), cannot fit in
    what is left."""
    free = available()
    if free is None:
        log.warning("model %s: free memory unknown here (no /proc/meminfo or cgroup); KV cache of up to %.2f GiB "
                    "not checked", name, estimate.bytes / GIB)
        return
    if estimate.bytes + host_cache_bytes + HEADROOM_BYTES <= free:
        return
    cache = f" and up to {host_cache_bytes / GIB:.2f} GiB more (KV copied out to host memory, cache_ram_mib; " \
        "an embedding context)" if host_cache_bytes else ""
    raise LoadRefused(
        f"n_ctx {n_ctx_seq} x parallel {n_seq} needs up to {estimate.bytes / GIB:.2f} GiB of KV cache "
        f"({estimate.n_layer} layers, F16){cache}, and {free / GIB:.2f} GiB is free here (less "
        f"{HEADROOM_BYTES >> 20} MiB kept for compute buffers): lower n_ctx or parallel"
        + (", or cache_ram_mib" if host_cache_bytes else ""),
        subject="n_ctx",
    )


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        # This process's own symbols (dlopen(NULL)): find_library would run ldconfig in a subprocess.
        fn: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return fn


def trim_heap() -> None:
    """Give the free pages inside glibc's heaps back to the kernel (malloc_trim): after an unload, the
    model's and its contexts' smaller blocks leave holes that malloc keeps otherwise. Blocking (a walk
    of every arena): call it off the event loop."""
    fn = _malloc_trim()
    if fn is not None:
        fn(0)
