"""The Falcon app, built by a factory from injected collaborators (no module-level state).

Middleware order: request id -> response signing (reads the body once, bounded) -> auth and rate
limits -> JSON parsing -> resources. Responses are signed last, after every other change. Every error leaves through `_handle_error` in the OpenAI shape; a 500 never echoes the
exception.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import falcon

from appliance import __version__
from appliance.desired import DesiredModels, SharedState, StateFull
from appliance.engine.registry import ModelRegistry
from appliance.evidence import detect_provider
from appliance.evidence.attestor import AttestationResource, Attestor
from appliance.metrics import Metrics
from appliance.settings import Settings, default_threads
from appliance.trust.auth import Auth
from appliance.trust.identity import Identity
from appliance.trust.signing import ResponseSigning
from appliance.web.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    InternalError,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    NotReady,
    UnsupportedMediaType,
)
from appliance.web.inference import Inference
from appliance.web.schemas import LoadModelRequest, UnloadModelRequest, parse

__all__ = ["create_app", "AppState", "ROUTES"]

log = logging.getLogger("appliance.http")
access_log = logging.getLogger("appliance.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_SECURITY_HEADERS = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cache-Control", "no-store"),
)
# What a browser client needs to read to verify a response (spec/signing.md) and to back off.
_CORS_EXPOSE = [
    "Signature", "Signature-Input", "Content-Digest", "Appliance-Stream", "Appliance-Client", "Appliance-Request-Digest",
    "X-Request-Id", "Retry-After",
]


@dataclass
class AppState:
    """What the resources share; built once per worker."""

    settings: Settings
    models: ModelRegistry
    metrics: Metrics
    identity: Identity
    wall_clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)
    attestor: object = None
    desired: DesiredModels | None = None
    """The models to serve, kept by the gunicorn master across worker restarts (None in-process)."""


# (path, resource attribute, responder suffix or None): the routes this app serves, also checked
# against spec/openapi.yaml by the contract tests.
ROUTES: list[tuple[str, str, str | None]] = [
    ("/v1/completions", "inference", "completions"),
    ("/v1/chat/completions", "inference", "chat"),
    ("/v1/models", "models", None),
    ("/completions", "inference", "completions"),
    ("/chat/completions", "inference", "chat"),
    ("/models", "models", None),
    ("/load_model", "admin", "load"),
    ("/unload_model", "admin", "unload"),
    ("/status", "status", None),
    ("/health", "health", None),
    ("/readiness", "readiness", None),
    ("/metrics", "prometheus", None),
    ("/v1/keys", "keys", None),
    ("/v1/attestation", "attestation", None),
]


# ---------------------------------------------------------------------------------------------
# Middleware


class RequestContext:
    """Request id, metrics and the access log (method, route, status, time: never bodies)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.t0 = time.perf_counter()
        rid = req.get_header("X-Request-Id")
        req.context.request_id = rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex
        resp.set_header("X-Request-Id", req.context.request_id)
        for k, v in _SECURITY_HEADERS:
            resp.set_header(k, v)

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource, req_succeeded: bool) -> None:
        route = req.uri_template or "unmatched"
        status = resp.status_code
        elapsed = time.perf_counter() - getattr(req.context, "t0", time.perf_counter())
        self.metrics.requests.labels(route, req.method, str(status)).inc()
        self.metrics.latency.labels(route).observe(elapsed)
        if status >= 400:
            self.metrics.errors.labels(route, str(status)).inc()
        access_log.info(
            "request",
            extra={
                "request_id": req.context.request_id,
                "method": req.method,
                "route": route,
                "status": status,
                "ms": round(elapsed * 1000, 2),
            },
        )


class JsonBody:
    """Enforce the content type, parse JSON once, refuse absurd nesting."""

    def __init__(self, settings: Settings) -> None:
        self.limits = settings.limits
        self._posts: dict[type, bool] = {}  # resource class -> has a POST responder

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource, params) -> None:
        req.context.json = None
        if req.method != "POST" or resource is None:
            return
        posts = self._posts.get(type(resource))
        if posts is None:
            posts = self._posts[type(resource)] = any(n == "on_post" or n.startswith("on_post_") for n in dir(resource))
        if not posts:
            return  # not a POST route: Falcon answers 405, the body is irrelevant
        ctype = (req.content_type or "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        raw = req.context.raw_body  # read once, bounded, by the signing middleware
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("The request body is not valid JSON") from None
        if _depth(body) > self.limits.max_json_depth:
            raise BadRequest(f"The request body nests deeper than {self.limits.max_json_depth} levels")
        req.context.json = body


def _depth(obj) -> int:
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return deepest


# ---------------------------------------------------------------------------------------------
# Resources


class Keys:
    """The public half of the appliance's signing identity (the attestation binds it to evidence)."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity

    def on_get(self, req, resp) -> None:
        resp.media = {
            "kid": self.identity.kid,
            "alg": "ed25519",
            "public_key": self.identity.public_b64(),
            "keys": [self.identity.public_jwk()],
        }


class Health:
    """Liveness: answers from the event loop without touching any model."""

    def on_get(self, req, resp) -> None:
        resp.media = {"status": "ok"}


class Readiness:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req, resp) -> None:
        # Every desired model, not just one: after a worker restart the models come back one by one.
        missing: list[str] = []
        if self.state.desired is not None:
            ready = {r.name for r in self.state.models.records() if r.state == "ready"}
            missing = [n for n in self.state.desired.names() if n not in ready]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            raise NotReady(f"Waiting for {len(missing)} model(s): {shown}", headers={"Retry-After": "1"})
        if not self.state.models.ready():
            raise NotReady("No model is loaded and healthy yet", headers={"Retry-After": "1"})
        resp.media = {"status": "ready", "models": [r.name for r in self.state.models.records() if r.state == "ready"]}


class Prometheus:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req, resp) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.state.metrics.render()


class Models:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req, resp) -> None:
        resp.media = {
            "object": "list",
            "data": [
                {
                    "id": r.name,
                    "object": "model",
                    "created": int(r.loaded_at or 0),
                    "owned_by": "appliance",
                    "meta": {"sha256": r.sha256, "n_ctx": r.n_ctx, "n_params": r.n_params, "size": r.size_bytes},
                }
                for r in self.state.models.records()
                if r.state == "ready"
            ],
        }


class Status:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req, resp) -> None:
        resp.media = {
            "version": __version__,
            "uptime_seconds": round(self.state.wall_clock() - self.state.started, 3),
            "devices": self.state.models.devices(),
            "models": [r.status() for r in self.state.models.records()],
        }


class Admin:
    """Model management; the trust layer restricts it to the admin scope off loopback."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_post_load(self, req, resp) -> None:
        body = parse(LoadModelRequest, req.context.json)
        overrides = {k: v for k, v in body.model_dump().items() if k not in ("model_name", "model_path") and v is not None}
        path = self._confine(body.model_path)
        settings = self.state.settings.model_settings(body.model_name, path, **overrides)
        desired = self.state.desired
        if desired is not None:
            try:
                desired.check_room(settings)  # before the load: never serve a model a restart would lose
            except StateFull as e:
                raise Conflict(f"model_name: too many models to keep across a worker restart ({e})", param="model_name") from None
        rec = self.state.models.load(settings)
        if desired is not None and rec.state == "ready":
            try:
                desired.add(settings)
            except StateFull as e:  # another load took the room meanwhile
                self.state.models.unload(rec.name, timeout=self.state.settings.server.graceful_timeout)
                raise Conflict(f"model_name: too many models to keep across a worker restart ({e})", param="model_name") from None
        resp.media = {"status": "loaded", "model": rec.status()}

    def _confine(self, raw: str) -> Path:
        """Model files only from the configured directories: no `..`, no symlink escape."""
        policy = self.state.settings.model_policy
        path = Path(raw)
        if ".." in path.parts or not path.is_absolute():
            raise BadRequest("model_path: must be an absolute path without '..'", param="model_path")
        if not policy.dirs:
            s = self.state.settings
            if s.auth.keys_configured or not s.server.loopback:
                raise Forbidden("model_path: loading at run time needs model_policy.dirs", param="model_path")
            return path  # the original appliance on loopback: any path the operator names
        real = Path(os.path.realpath(path))
        for d in policy.dirs:
            root = Path(os.path.realpath(d))
            if real == root or root in real.parents:
                return real
        raise Forbidden("model_path: outside the configured model directories", param="model_path")

    def on_post_unload(self, req, resp) -> None:
        body = parse(UnloadModelRequest, req.context.json)
        desired = self.state.desired
        try:
            rec = self.state.models.unload(body.model_name, timeout=self.state.settings.server.graceful_timeout)
        except ModelNotFound:
            # A desired model that failed to load (or is still waiting for its turn after a restart):
            # unloading it is how the operator stops /readiness from waiting for it.
            if desired is not None and desired.remove(body.model_name):
                resp.media = {"status": "unloaded", "model": {"name": body.model_name}}
                return
            raise
        if desired is not None:
            desired.remove(rec.name)
        resp.media = {"status": "unloaded", "model": {"name": rec.name}}


# ---------------------------------------------------------------------------------------------
# Errors


def _send_error(resp: falcon.Response, err: ApiError) -> None:
    resp.status = err.status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps(err.body())
    for k, v in err.headers.items():
        resp.set_header(k, v)


def _handle_error(req: falcon.Request, resp: falcon.Response, ex: Exception, params) -> None:
    if isinstance(ex, ApiError):
        err = ex
    elif isinstance(ex, falcon.HTTPRouteNotFound) or isinstance(ex, falcon.HTTPNotFound):
        err = NotFound(f"No route {req.method} {req.path}")
    elif isinstance(ex, falcon.HTTPMethodNotAllowed):
        err = MethodNotAllowed(f"Method {req.method} is not allowed on {req.path}")
        allow = ex.headers.get("Allow") if ex.headers else None
        if allow:
            err.headers["Allow"] = allow
    elif isinstance(ex, falcon.HTTPError):
        err = ApiError(ex.title or "Request error", headers=dict(ex.headers or {}))
        err.status = ex.status_code
        err.type = "invalid_request_error" if ex.status_code < 500 else "server_error"
    else:
        log.error("unhandled %s on %s", type(ex).__name__, req.uri_template or "unmatched", exc_info=ex)
        err = InternalError()
    _send_error(resp, err)


# ---------------------------------------------------------------------------------------------
# Factory


def create_app(
    settings: Settings,
    *,
    models: ModelRegistry | None = None,
    metrics: Metrics | None = None,
    wall_clock: Callable[[], float] = time.time,
    identity: Identity | None = None,
    provider=None,
    tls_public_key_sha256: str | None = None,
    extra_middleware: list | None = None,
    shared: SharedState | None = None,
) -> tuple[falcon.App, AppState]:
    """`shared`: the gunicorn master's memory (desired models, worker restarts, measurement log); None
    in-process, where nothing outlives the app."""
    identity = identity or Identity(clock=wall_clock)
    metrics = metrics or Metrics()
    if models is None and settings.server.cpu_backend != "auto":
        from appliance.engine.llama import set_cpu_backend

        set_cpu_backend(settings.server.cpu_backend)
    if models is None and shared is not None:
        from appliance.engine.cpuprobe import BackendChoice
        from appliance.engine.llama import set_backend_choice

        # The CPU build the master chose and probed before forking this worker (or why there is none).
        chosen, error = shared.backends.chosen()
        if chosen is not None or error is not None:
            set_backend_choice(BackendChoice.from_dict(chosen) if chosen else None, error, shared.backends.in_use)
    if provider is None and settings.attestation.provider != "none":
        a = settings.attestation
        provider = detect_provider(
            a.provider, configfs_root=a.configfs_root, nsm_device=a.nsm_device, gramine_root=a.gramine_root,
            rtmr_path=a.rtmr_path,
        )
    attestor_box: list[Attestor] = []

    def measured(name: str, sha256_hex: str) -> None:  # runs in the loading thread
        if attestor_box:
            attestor = attestor_box[0]
            attestor.measure_model(name, sha256_hex)
            if shared is not None and attestor.event_log:
                try:
                    shared.measurements.replace(lambda: list(attestor.event_log))
                except StateFull as e:
                    log.error("the runtime measurement log no longer fits its shared memory (%s): after a worker "
                              "restart it would not replay to the register", e)

    models = models or ModelRegistry(
        observer=metrics,
        wall_clock=wall_clock,
        allowed_sha256=frozenset(settings.model_policy.allowed_sha256),
        on_loaded=measured,
        # Map model files from disk only where no attestation provider (not even simulated) is active.
        default_mmap=provider is None,
    )
    metrics.watch_models(models)
    if shared is not None:
        metrics.watch_worker_restarts(shared.deaths)
    state = AppState(settings, models, metrics, identity, wall_clock, started=wall_clock(),
                     desired=shared.desired if shared is not None else None)
    attestor = Attestor(settings, identity, models, provider, clock=wall_clock, tls_public_key_sha256=tls_public_key_sha256)
    if shared is not None:
        # The register still holds what an earlier worker extended: the log a verifier replays must too.
        attestor.event_log.extend(shared.measurements.events())
    attestor_box.append(attestor)
    state.attestor = attestor
    seeds = {m.name: m.seed for m in settings.models}
    resources = {
        "inference": Inference(
            models,
            settings.limits,
            wall_clock=wall_clock,
            default_seeds=lambda name: seeds.get(name, settings.model_defaults.seed),
            stream_writes=settings.server.stream_writes,
            cpus=default_threads(),
            stream_written=lambda writer: metrics.streams.labels(writer).inc(),
        ),
        "models": Models(state),
        "admin": Admin(state),
        "status": Status(state),
        "health": Health(),
        "readiness": Readiness(state),
        "prometheus": Prometheus(state),
        "keys": Keys(identity),
        "attestation": AttestationResource(attestor, settings, clock=wall_clock),
    }
    app = falcon.App(
        middleware=[
            RequestContext(metrics),
            ResponseSigning(identity, settings.limits.max_body_bytes),
            *([falcon.CORSMiddleware(allow_origins=settings.server.cors_origins, expose_headers=_CORS_EXPOSE)] if settings.server.cors_origins else []),
            Auth(settings, metrics, clock=wall_clock),
            *(extra_middleware or []),
            JsonBody(settings),
        ],
        request_type=falcon.Request,
    )
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.secure_cookies_by_default = True
    for path, key, suffix in ROUTES:
        if suffix:
            app.add_route(path, resources[key], suffix=suffix)
        else:
            app.add_route(path, resources[key])
    # Falcon matches handlers by the exception's MRO, so its built-in HTTPError handler would win over
    # one for Exception: register ours for both, and every error leaves in the OpenAI shape.
    app.add_error_handler(Exception, _handle_error)
    app.add_error_handler(falcon.HTTPError, _handle_error)
    return app, state
