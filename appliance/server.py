"""Embedded gunicorn: one gevent worker process that owns the models.

One worker, on purpose: models live in the worker's memory and the appliance has one identity
(the trust layer's signing key); concurrency comes from greenlets for I/O and one scheduler thread per
model for llama.cpp. The app is built after the fork (no preload), so CUDA and OpenMP are never
initialised in the master. SIGTERM stops accepting, lets in-flight requests finish (up to
`graceful_timeout`), stops the engines and exits 0.
"""

from __future__ import annotations

import logging
from typing import Callable

import gevent
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger
from gunicorn.workers.ggevent import GeventWorker

from .direct_writes import DirectWrites
from .settings import Settings

__all__ = ["ApplianceServer", "bind_address"]

log = logging.getLogger("appliance.server")


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class _QuietLogger(Logger):
    """gunicorn's logger without its access log: ours is structured and never holds request data."""

    def access(self, resp, req, environ, request_time) -> None:
        pass


class ApplianceServer(BaseApplication):
    def __init__(self, settings: Settings, app_factory: Callable[..., tuple]) -> None:
        from .security.identity import Identity

        self.settings = settings
        self.app_factory = app_factory
        self.state = None
        # Made here, in the master, before the fork: a restarted worker keeps the same identity.
        self.identity = Identity()
        self.tls = None
        if settings.server.tls == "attested":
            from .security.tls import make_attested_tls

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
            "limit_request_line": 8190,
            "limit_request_fields": 100,
            "worker_exit": self._worker_exit,
            "post_worker_init": self._post_worker_init,
        }
        if self.tls is not None:
            options["certfile"] = self.tls.certfile
            options["keyfile"] = self.tls.keyfile
        for key, value in options.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def load(self):
        app, self.state = self.app_factory(
            self.settings, self.identity, self.tls.spki_sha256 if self.tls is not None else None
        )
        if self.tls is None:
            return DirectWrites(app)  # streamed tokens may then be written by a scheduler thread
        return app

    def _post_worker_init(self, worker) -> None:
        # Serve at once (/health answers while models load); load configured models in background.
        loads = [gevent.spawn(self._load_model, ms) for ms in self.settings.models]
        if self.settings.attestation.seal_after_startup:
            gevent.spawn(self._seal_after, loads)

    def _seal_after(self, loads) -> None:
        gevent.joinall(loads)
        provider = getattr(self.state.attestor, "provider", None)
        seal = getattr(provider, "seal", None)
        if seal is None:
            log.warning("attestation.seal_after_startup: the %s provider has nothing to seal", getattr(provider, "name", "none"))
            return
        sealed = gevent.get_hub().threadpool.apply(seal)
        log.info("runtime measurement register sealed: %s", bool(sealed))

    def _load_model(self, ms) -> None:
        try:
            self.state.models.load(ms)
        except Exception as e:  # the model is recorded as failed; /status and /readiness show it
            log.error("configured model %s failed to load: %s", ms.name, getattr(e, "message", type(e).__name__))

    def _worker_exit(self, server, worker) -> None:
        if self.state is not None:
            self.state.models.stop_all(timeout=self.settings.server.graceful_timeout)
