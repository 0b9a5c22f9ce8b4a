"""The one door to real OS threads, locks and blocking calls under gevent.

Once gunicorn's gevent worker has monkey-patched the process, `threading.Lock` is a greenlet lock and
`os.fork`, `os.waitpid` and `select.select` wait on the hub. Work that runs on real OS threads (a
model's scheduler, model loads, TEE interfaces on the hub's pool threads) needs the originals; a
greenlet that must block (a llama.cpp call, a file read) hands the work to the hub's thread pool so
the event loop keeps serving. Outside gevent (tests, the master before fork) the same calls work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import gevent
from gevent import monkey

__all__ = ["Lock", "real_lock", "start_thread", "off_loop", "fork", "waitpid", "select_fds"]

T = TypeVar("T")

Lock = Any  # _thread.LockType: acquire(blocking=True, timeout=-1) -> bool, release(), a context manager

_allocate_lock: Callable[[], Any] = monkey.get_original("_thread", "allocate_lock")
_start_new_thread: Callable[..., int] = monkey.get_original("_thread", "start_new_thread")


def real_lock() -> Lock:
    """A lock that blocks the OS thread, shareable between a greenlet and a real thread."""
    return _allocate_lock()


def start_thread(fn: Callable[[], object]) -> None:
    """Run `fn` on a new real OS thread (never a greenlet)."""
    _start_new_thread(fn, ())


def off_loop(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Call `fn` on one of the hub's pool threads and wait for it, blocking only this greenlet.

    Exceptions propagate to the caller, and only to it: the pool would also print each one's traceback
    to stderr (gevent reports errors in pool threads to the hub), so a refused load or a prompt the
    template rejects would leave a traceback in the log. Outside a gevent worker this is still
    correct, only slower than a plain call."""

    def caught() -> tuple[bool, Any]:
        try:
            return True, fn(*args, **kwargs)
        except Exception as e:
            return False, e

    ok, value = gevent.get_hub().threadpool.apply(caught)
    if ok:
        result: T = value
        return result
    raise value


def fork() -> int:
    """os.fork as the OS has it (gevent's would re-initialise the event loop in the child)."""
    f: Callable[[], int] = monkey.get_original("os", "fork")
    return f()


def waitpid(pid: int, options: int) -> tuple[int, int]:
    w: Callable[[int, int], tuple[int, int]] = monkey.get_original("os", "waitpid")
    return w(pid, options)


def select_fds(
    r: list[int], w: list[int], x: list[int], timeout: float | None = None
) -> tuple[list[int], list[int], list[int]]:
    s: Callable[..., tuple[list[int], list[int], list[int]]] = monkey.get_original("select", "select")
    return s(r, w, x, timeout)

