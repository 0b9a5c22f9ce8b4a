"""Embedded gunicorn: one gevent worker process that owns the models.

One worker, on purpose: models live in the worker's memory and the appliance has one identity
(the trust layer's signing key); concurrency comes from greenlets for I/O and one scheduler thread per
model for llama.cpp. The app is built after the fork (no preload), so CUDA and OpenMP are never
initialised in the master. SIGTERM stops accepting, lets in-flight requests finish (up to
`graceful_timeout`), stops the engines and exits 0.

A dead worker loses nothing: the master keeps the desired models (configured, plus loaded at run
time, minus unloaded) in memory it maps before forking (`desired.SharedState`); when the worker dies
(SIGILL or SIGSEGV in llama.cpp, the OOM killer), the master logs how, counts it, and forks a new
worker that loads every desired model again. Its in-flight requests end with their connections,
which only the dead worker held.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import gevent
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.glogging import Logger
from gunicorn.workers.base_async import ALREADY_HANDLED
from gunicorn.workers.ggevent import GeventWorker

from appliance.buildinfo import binary_digest
from appliance.desired import CONFIG, RUNTIME, SharedState
from appliance.engine.errors import Conflict, ShuttingDown
from appliance.logs import JsonFormatter
from appliance.osthreads import off_loop
from appliance.settings import Settings
from appliance.web.streams import DirectWrites
from appliance.web.websocket import UPGRADED

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

    from appliance.settings import ModelSettings
    from appliance.trust.tls import AttestedTls
    from appliance.web.state import AppState

__all__ = ["ApplianceServer", "bind_address"]

log = logging.getLogger("appliance.server")
DRAIN_MARGIN_S = 2.0
"""How long before graceful_timeout runs out the requests still generating are ended cleanly."""


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _fit_open_files(connections: int) -> None:
    """Raise the soft open-file limit (up to the hard one) to fit `connections` sockets plus the
    models, logs and listeners; a container's default of 1024 would cap connections below the setting."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files are limited to %d (hard limit): fewer than server.worker_connections = %d "
                        "connections can be open at once", new, connections)


class _QuietLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's logger without its access log: ours is structured and never holds request data."""

    def access(self, resp: object, req: object, environ: object, request_time: object) -> None:
        pass

    def setup(self, cfg: object) -> None:
        """gunicorn's own lines (boots, worker deaths, its request-parsing errors, which may quote what a
        client sent) go out as our JSON lines, through the same telemetry policy, after `_GunicornLines`."""
        super().setup(cfg)
        for handler in self.error_log.handlers:
            handler.setFormatter(JsonFormatter())
            handler.addFilter(_GunicornLines())


class Upgraded:
    """WSGI wrapper: a request whose connection became a WebSocket session (web/websocket.py) has
    nothing more for gunicorn to write; gunicorn's marker says so, and it closes the connection."""

    def __init__(self, app: WSGIApplication) -> None:
        self._app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        result = self._app(environ, start_response)
        if not environ.get(UPGRADED):
            return result
        close = getattr(result, "close", None)
        if close is not None:
            close()
        return cast("Iterable[bytes]", ALREADY_HANDLED)


def _no_request_log(worker: object, req: object) -> None:
    pass


class _GunicornLines(logging.Filter):
    """gunicorn's messages as the telemetry policy allows them (spec/telemetry.md §5). Some quote a
    request (`Error handling request %s %s` with its URI; `Invalid request from ip=...: <error>`, which
    gunicorn formats itself, quoting what the client sent). Only the templates below keep their
    arguments (pids, signal names, exit codes, addresses, versions); any other template loses them; a
    message with no arguments is shown only when it is one of gunicorn's fixed sentences."""

    WITH_ARGS = frozenset({
        "Starting gunicorn %s", "Listening at: %s (%s)", "Listening at: %s", "Using worker: %s",
        "Booting worker with pid: %s", "Worker exiting (pid: %s)", "WORKER TIMEOUT (pid:%s)",
        "Worker (pid:%s) exited with code %s.", "Worker (pid:%s) was sent %s!",
        "Worker (pid:%s) was sent %s! Perhaps out of memory?", "Handling signal: %s", "Shutting down: %s",
        "Worker graceful timeout (pid:%s)", "Reaped unknown child process (pid:%s, status:%s)",
    })
    FIXED = frozenset({
        "Arbiter booted", "graceful stop of workers", "Autorestarting worker after current request.",
        "Control socket disabled", "Unhandled exception in main loop", "Exception in worker process",
        "Error handling request (no URI read)", "Socket error processing request.", "Error handling request",
        "Ignoring connection reset", "Ignoring EPIPE", "Ignoring socket not connected", "ssl connection closed",
        "Failed to send error message.", "Error processing SSL request.", "Quick shutdown requested",
    })

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else "?"
        if record.args:
            if msg not in self.WITH_ARGS:
                record.msg, record.args = msg.replace("%s", "<withheld>").replace("%r", "<withheld>"), None
        elif msg not in self.FIXED:
            record.msg = "a gunicorn message withheld by the telemetry policy (it may quote a request)"
        return True


# Why a worker may have died, for the log line that names the signal.
_SIGNAL_NOTES: dict[int, str] = {
    signal.SIGKILL: "perhaps the OOM killer",
    signal.SIGILL: "an illegal instruction in native code: a CPU backend this CPU cannot run? see server.cpu_backend",
    signal.SIGSEGV: "a crash in native code",
    signal.SIGBUS: "a bus error: a memory-mapped model file truncated while in use?",
    signal.SIGFPE: "an arithmetic fault in native code",
    signal.SIGABRT: "aborted by native code",
}


def describe_exit(code: int | None, sig: int | None, core_dumped: bool = False, *, notes: bool = True) -> tuple[str, str]:
    """(cause label, sentence) for a worker's end: the signal that killed it or its exit code."""
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal_{sig}"
        note = _SIGNAL_NOTES.get(sig) if notes else None
        return name, f"killed by {name}" + (f" ({note})" if note else "") + (", core dumped" if core_dumped else "")
    if code is not None:
        return f"exit_{code}", f"exited with code {code}"
    return "unknown", "ended (its exit status was not seen)"


class _Arbiter(Arbiter):  # type: ignore[misc]  # gunicorn is untyped
    """gunicorn's master, told how each worker ended.

    gunicorn's hooks (`child_exit`, `worker_exit`) get the worker but not its wait status, and
    `reap_workers` keeps it to itself: so look at each worker's status first with WNOWAIT, which
    leaves the child waitable, then let gunicorn reap it as always.
    """

    def __init__(self, app: ApplianceServer) -> None:
        super().__init__(app)
        self._asked_to_exit: set[int] = set()

    def kill_worker(self, pid: int, sig: int) -> None:
        # The master's own signals (shutdown, reload, an extra worker) end a worker on purpose. A
        # timeout's SIGABRT, and the SIGKILL after it, do not: a hung worker is a restart.
        worker = self.WORKERS.get(pid)
        if sig != signal.SIGABRT and not (worker is not None and worker.aborted):
            self._asked_to_exit.add(pid)
        super().kill_worker(pid, sig)

    def reap_workers(self) -> None:
        statuses = {}
        for pid in list(self.WORKERS):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                continue
            if info is not None:
                statuses[pid] = info
        before = dict(self.WORKERS)
        super().reap_workers()  # HaltServer (a worker that could not boot) propagates: nothing restarts
        for pid, worker in before.items():
            if pid in self.WORKERS:
                continue
            info = statuses.get(pid)
            code = sig = None
            if info is not None:
                if info.si_code == os.CLD_EXITED:
                    code = info.si_status
                else:
                    sig = info.si_status
            expected = pid in self._asked_to_exit or not self.LISTENERS  # no listeners: the master is stopping
            self._asked_to_exit.discard(pid)
            self.app.worker_ended(
                pid, code, sig,
                core_dumped=info is not None and info.si_code == os.CLD_DUMPED,
                timed_out=bool(worker.aborted), expected=expected,
            )


class ApplianceServer(BaseApplication):  # type: ignore[misc]  # gunicorn is untyped
    def __init__(self, settings: Settings, app_factory: Callable[..., tuple[WSGIApplication, AppState]]) -> None:
        from appliance.trust.identity import Identity

        self.settings = settings
        self.app_factory = app_factory
        self.state: AppState | None = None  # the worker's, once load() built the app
        # No core files: a crashing worker (SIGILL, SIGSEGV in native code) would write its memory,
        # the signing key included, to a disk the trust model does not trust. Workers inherit this.
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        _fit_open_files(settings.server.worker_connections)
        # Made here, in the master, before the fork: a restarted worker keeps the same identity.
        self.identity = Identity()
        # The digest the claims name, taken from the bytes this process runs, at startup (cached and
        # inherited by every worker), not whenever the first attestation request comes.
        binary_digest()
        # Also before the fork: the desired models and the restart count outlive every worker.
        self.shared = SharedState(settings.models)
        self._replacing: dict[str, Any] | None = None  # master: the death the next worker replaces
        self.tls: AttestedTls | None = None
        if settings.server.tls == "attested":
            from appliance.trust.tls import make_attested_tls

            self.tls = make_attested_tls(settings.server.host)
        super().__init__()

    def load_config(self) -> None:
        s = self.settings.server
        options = {
            "bind": [bind_address(s.host, s.port)],
            "workers": 1,
            "worker_class": GeventWorker,
            "logger_class": _QuietLogger,
            "worker_connections": s.worker_connections,
            "timeout": s.worker_timeout,
            "graceful_timeout": s.graceful_timeout,
            "keepalive": s.keepalive,
            "loglevel": s.log_level,
            "accesslog": None,
            "errorlog": "-",
            "preload_app": False,
            "control_socket_disable": True,
            "proc_name": "appliance",
            # gunicorn's default hook logs each request's method and path (a path can hold a client's
            # data): the access log is ours (route templates only).
            "pre_request": _no_request_log,
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "worker_exit": self._worker_exit,
            "pre_fork": self._pre_fork,
            "when_ready": self._when_ready,
            "post_worker_init": self._post_worker_init,
        }
        if self.tls is not None:
            options["certfile"] = self.tls.certfile
            options["keyfile"] = self.tls.keyfile
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def run(self) -> None:
        # BaseApplication.run, with the arbiter that learns how workers end.
        try:
            _Arbiter(self).run()
        except RuntimeError as e:
            print(f"\nError: {e}\n", file=sys.stderr)
            sys.stderr.flush()
            sys.exit(1)

    def worker_ended(
        self, pid: int, code: int | None, sig: int | None, *, core_dumped: bool, timed_out: bool, expected: bool
    ) -> None:
        """Master: a worker was reaped. Unless the master ended it, count the restart and say why."""
        # After a timeout the master itself sent SIGABRT, then SIGKILL: no guessing at the OOM killer.
        cause, detail = describe_exit(code, sig, core_dumped, notes=not timed_out)
        if expected:
            log.info("worker %d %s", pid, detail, extra={"pid": pid, "cause": cause})
            return
        if timed_out:
            cause = "timeout"
            detail = (f"hung (no heartbeat for server.worker_timeout = {self.settings.server.worker_timeout}s; "
                      f"the master sent SIGABRT) and was then {detail}")
        totals = self.shared.deaths.record(pid=pid, cause=cause, detail=detail, wall=time.time(), monotonic=time.monotonic())
        if cause == "SIGILL":
            # An instruction this CPU cannot run, past the probe: the next worker chooses another build.
            build = self.shared.backends.refuse_in_use("killed a worker with SIGILL")
            if build is not None:
                log.error(
                    "llama.cpp's %s build%s was in use: the next worker will not choose it again",
                    build["module"], "" if build["extra_buffers"] else " (without extra buffers)",
                )
                self._choose_cpu_backend()  # before the next worker is forked
        self._replacing = totals["last"]
        n = len(self.shared.desired.names())
        log.error(
            "worker %d %s; starting a new worker, which loads the %d desired model(s) again", pid, detail, n,
            extra={"pid": pid, "cause": cause, "restarts": totals["restarts"], "desired_models": n},
        )

    def load(self) -> WSGIApplication:
        app, self.state = self.app_factory(
            self.settings, self.identity, self.tls.spki_sha256 if self.tls is not None else None, shared=self.shared
        )
        if self.tls is None:
            return Upgraded(DirectWrites(app))  # streamed tokens may then be written by a scheduler thread
        return Upgraded(app)

    def _when_ready(self, server: Arbiter) -> None:
        # Master, bound and not yet forked: choose the CPU build once, here, where no thread can hold a
        # lock a forked probe child would need (a worker loading models in its thread pool can).
        self._choose_cpu_backend()

    def _choose_cpu_backend(self) -> None:
        from appliance.engine.cpuprobe import choose_backend, llama_lib_dir
        from appliance.settings import default_threads

        lib_dir = llama_lib_dir()
        if lib_dir is None:  # a build without CPU modules: the worker takes what ggml has
            return
        try:
            choice = choose_backend(lib_dir, self.settings.server.cpu_backend, n_threads=default_threads(),
                                    refused=self.shared.backends.refused())
        except RuntimeError as e:
            log.error("llama.cpp: %s", e)
            self.shared.backends.choose(None, str(e))
            return
        self.shared.backends.choose(choice.to_dict())

    def _pre_fork(self, server: Arbiter, worker: GeventWorker) -> None:
        # Master, before the fork: tell the new worker whether it replaces a dead one (not a reload's).
        worker.replaces, self._replacing = self._replacing, None

    def _post_worker_init(self, worker: GeventWorker) -> None:
        # Serve at once (/health answers while models load; /readiness says 503 until every desired
        # model is back); load the desired models in the background.
        restore = gevent.spawn(self._restore, getattr(worker, "replaces", None))
        if self.settings.attestation.seal_after_startup:
            gevent.spawn(self._seal_after, [restore])
        self._on_sigterm_drain_until_deadline()

    def _on_sigterm_drain_until_deadline(self) -> None:
        """SIGTERM: gunicorn stops accepting and lets requests run for graceful_timeout, then kills what is
        left (the master SIGKILLs the worker at the same moment), cutting streams off mid-event. So just
        before that, every request still generating is ended by the engine with a clean `shutting down`
        error (503 and Retry-After, or a stream's error event, signed like any other) and the worker
        exits on its own."""
        previous = signal.getsignal(signal.SIGTERM)
        graceful = self.settings.server.graceful_timeout
        deadline = graceful - DRAIN_MARGIN_S if graceful > 2 * DRAIN_MARGIN_S else graceful / 2
        armed: list[gevent.Greenlet] = []

        def on_sigterm(sig: int, frame: Any) -> None:
            if self.state is not None:
                self.state.stopping = True
            if callable(previous):
                previous(sig, frame)
            if not armed:
                armed.append(gevent.spawn_later(deadline, self._end_what_is_left))

        signal.signal(signal.SIGTERM, on_sigterm)

    def _end_what_is_left(self) -> None:
        if self.state is None:
            return
        busy = sum(r.engine.busy_slots + r.engine.queue_depth for r in self.state.models.records() if r.engine is not None)
        if busy:
            log.warning("shutdown: graceful_timeout nearly spent; %d request(s) still generating end with a "
                        "'shutting down' error", busy, extra={"requests": busy})
        self.state.models.abort_all(ShuttingDown())

    def _worker_state(self) -> AppState:
        """The worker's app state: load() builds it in the worker before anything here runs."""
        if self.state is None:
            raise RuntimeError("the worker's app is not built yet")
        return self.state

    def _restore(self, last: dict[str, Any] | None) -> None:
        """Load the desired models: the configured ones together (as at first boot), then those loaded
        at run time, one by one in the order they were loaded (the same order, the same memory)."""
        desired = self.shared.desired.settings()
        if last is not None:
            log.info(
                "worker restarted after its predecessor %s: loading %d desired model(s) again", last["detail"], len(desired),
                extra={"desired_models": len(desired)},
            )
        gevent.joinall([gevent.spawn(self._load_model, ms, "configured") for origin, ms in desired if origin == CONFIG])
        for origin, ms in desired:
            if origin == RUNTIME and ms.name in self.shared.desired.names():  # not unloaded meanwhile
                self._load_model(ms, "runtime-loaded")
        if last is not None:
            state = self._worker_state()
            ready = {r.name for r in state.models.records() if r.state == "ready"}
            missing = [n for n in self.shared.desired.names() if n not in ready]
            seconds = round(time.monotonic() - last["monotonic"], 3)
            if missing:
                log.error("after the worker restart, %d desired model(s) did not load: %s", len(missing), ", ".join(missing))
            else:
                log.info(
                    "all %d desired model(s) back %.2fs after the previous worker died", len(ready), seconds,
                    extra={"seconds_since_death": seconds},
                )

    def _seal_after(self, loads: list[gevent.Greenlet]) -> None:
        gevent.joinall(loads)
        state = self._worker_state()
        provider = getattr(state.attestor, "provider", None)
        seal = getattr(provider, "seal", None)
        if seal is None:
            log.warning("attestation.seal_after_startup: the %s provider has nothing to seal", getattr(provider, "name", "none"))
            return
        sealed = off_loop(seal)
        log.info("runtime measurement register sealed: %s", bool(sealed))

    def _load_model(self, ms: ModelSettings, kind: str) -> None:
        try:
            state = self._worker_state()
            rec = state.models.load(ms)
            if rec.state == "ready" and rec.sha256:
                self.shared.desired.pin(ms.name, rec.sha256)
        except Conflict:  # loaded (or loading) again through POST /load_model meanwhile
            log.info("%s model %s was loaded meanwhile", kind, ms.name)
        except Exception as e:  # the model is recorded as failed; /status and /readiness show it
            log.error("%s model %s failed to load: %s", kind, ms.name, getattr(e, "message", type(e).__name__))

    def _worker_exit(self, server: Arbiter, worker: GeventWorker) -> None:
        if self.state is not None:
            self.state.models.stop_all(timeout=self.settings.server.graceful_timeout)
