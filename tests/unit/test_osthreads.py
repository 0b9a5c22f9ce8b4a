"""appliance/osthreads.py: off_loop runs on a pool thread and hands back results and exceptions."""

from __future__ import annotations

import threading

import pytest

from appliance.engine.errors import LoadRefused
from appliance.osthreads import off_loop


def test_off_loop_returns_the_result_from_another_thread():
    here = threading.get_ident()
    assert off_loop(lambda a, *, b: (a + b, threading.get_ident() != here), 2, b=3) == (5, True)


def test_off_loop_raises_in_the_caller_only(capfd):
    """An exception reaches the caller, traceback intact, and nothing is printed: gevent's pool would
    print every one to stderr (a refused load, a prompt its template rejects: a traceback in the log
    for an ordinary 400, found while fuzzing)."""

    def refuse() -> None:
        raise LoadRefused("n_ctx too large", subject="n_ctx")

    with pytest.raises(LoadRefused, match="n_ctx too large") as info:
        off_loop(refuse)
    assert info.value.subject == "n_ctx"
    assert any(frame.name == "refuse" for frame in info.traceback)
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "LoadRefused" not in err and "LoadRefused" not in out
