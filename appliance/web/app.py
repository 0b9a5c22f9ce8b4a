"""The Falcon app, wired by a factory from injected collaborators (no module-level state).

The middlewares are in web/middleware.py (their order is documented there), the resources in
web/resources/, the error table in web/errors.py. Every error leaves through `handle_error` in the
OpenAI shape; a 500 never echoes the exception.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import falcon

from appliance.conversations import boot_key, open_store
from appliance.desired import SharedState, StateFull
from appliance.engine.cpuprobe import BackendChoice
from appliance.engine.llama import BackendConfig
from appliance.engine.registry import ModelRegistry
from appliance.evidence import EvidenceProvider, detect_provider
from appliance.evidence.attestor import Attestor
from appliance.metrics import Metrics
from appliance.osthreads import off_loop
from appliance.settings import Settings, default_threads
from appliance.trust.auth import Auth
from appliance.trust.identity import Identity
from appliance.web.errors import handle_error
from appliance.web.middleware import Authentication, BodyLimit, JsonBody, RequestContext, ResponseSigning
from appliance.web.resources.attestation import Attestation, Keys
from appliance.web.resources.conversations import ConversationItem, ConversationItems, Conversations, OneConversation
from appliance.web.resources.embeddings import Embeddings
from appliance.web.resources.inference import Inference
from appliance.web.resources.models import Admin, Models
from appliance.web.resources.ops import Health, Prometheus, Readiness, Status
from appliance.web.resources.responses import InputItems, Responses, StoredResponses
from appliance.web.resources.tokens import Tokens
from appliance.web.resources.ui import Ui, UiAssets
from appliance.web.state import AppState

if TYPE_CHECKING:
    from falcon._typing import SyncMiddleware  # falcon's own alias for what App(middleware=) takes

    Middleware = SyncMiddleware[falcon.Request, falcon.Response]

__all__ = ["create_app", "AppState", "ROUTES"]

log = logging.getLogger("appliance.http")

# What a browser client needs to read to verify a response (spec/signing.md) and to back off.
_CORS_EXPOSE = [
    "Signature", "Signature-Input", "Content-Digest", "Appliance-Stream", "Appliance-Client", "Appliance-Request-Digest",
    "X-Request-Id", "Retry-After",
]


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
    ("/tokenize", "tokens", "tokenize"),
    ("/detokenize", "tokens", "detokenize"),
    ("/v1/completions/input_tokens", "tokens", "completion_input_tokens"),
    ("/completions/input_tokens", "tokens", "completion_input_tokens"),
    ("/v1/chat/completions/input_tokens", "tokens", "chat_input_tokens"),
    ("/chat/completions/input_tokens", "tokens", "chat_input_tokens"),
    ("/v1/embeddings", "embeddings", None),
    ("/v1/rerank", "embeddings", "rerank"),
    ("/v1/responses", "responses", None),
    ("/v1/responses/{response_id}", "stored_responses", None),
    ("/v1/responses/{response_id}/input_items", "input_items", None),
    ("/v1/conversations", "conversations", None),
    ("/v1/conversations/{conversation_id}", "conversation", None),
    ("/v1/conversations/{conversation_id}/items", "conversation_items", None),
    ("/v1/conversations/{conversation_id}/items/{item_id}", "conversation_item", None),
    ("/", "ui", None),
    ("/ui/{name}", "ui", "asset"),
]


def create_app(
    settings: Settings,
    *,
    models: ModelRegistry | None = None,
    metrics: Metrics | None = None,
    wall_clock: Callable[[], float] = time.time,
    identity: Identity | None = None,
    provider: EvidenceProvider | None = None,
    tls_public_key_sha256: str | None = None,
    extra_middleware: Sequence[Middleware] | None = None,
    shared: SharedState | None = None,
) -> tuple[falcon.App[falcon.Request, falcon.Response], AppState]:
    """`shared`: the gunicorn master's memory (desired models, worker restarts, measurement log); None
    in-process, where nothing outlives the app."""
    identity = identity or Identity(clock=wall_clock)
    metrics = metrics or Metrics()
    backend = BackendConfig(preference=settings.server.cpu_backend)
    if shared is not None:
        # The CPU build the master chose and probed before forking this worker (or why there is none).
        chosen, error = shared.backends.chosen()
        if chosen is not None or error is not None:
            backend = dataclasses.replace(
                backend, preset=BackendChoice.from_dict(chosen) if chosen else None, preset_error=error,
                on_chosen=shared.backends.in_use,
            )
    if provider is None and settings.attestation.provider != "none":
        a = settings.attestation
        provider = detect_provider(
            a.provider, configfs_root=a.configfs_root, nsm_device=a.nsm_device, gramine_root=a.gramine_root,
            rtmr_path=a.rtmr_path,
        )
    built_registry = models is None
    models = models or ModelRegistry(
        observer=metrics,
        wall_clock=wall_clock,
        allowed_sha256=frozenset(settings.model_policy.allowed_sha256),
        # Map model files from disk only where no attestation provider (not even simulated) is active.
        default_mmap=provider is None,
        backend=backend,
    )
    metrics.watch_models(models)
    if shared is not None:
        metrics.watch_worker_restarts(shared.deaths)
    attestor = Attestor(settings, identity, models, provider, clock=wall_clock, tls_public_key_sha256=tls_public_key_sha256)
    if shared is not None:
        # The register still holds what an earlier worker extended: the log a verifier replays must too.
        attestor.event_log.extend(shared.measurements.events())
    if built_registry:
        models.on_loaded(_measurer(attestor, shared))
    state = AppState(settings, models, metrics, identity, wall_clock, started=wall_clock(), attestor=attestor,
                     desired=shared.desired if shared is not None else None)
    seeds = {m.name: m.seed for m in settings.models}
    # Sealed under a key derived from the identity (made in the master before the fork: the same after a
    # worker restart, gone with the process) or a TEE's sealing secret where the provider offers one.
    store = open_store(
        settings.conversations, boot_key(identity, provider),
        clock=wall_clock, run_blocking=off_loop,
    )
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
        "tokens": Tokens(models, settings.limits.default_max_tokens),
        "embeddings": Embeddings(models),
        "models": Models(state),
        "admin": Admin(state),
        "status": Status(state),
        "health": Health(),
        "readiness": Readiness(state),
        "prometheus": Prometheus(state),
        "keys": Keys(identity),
        "attestation": Attestation(attestor, settings, clock=wall_clock, metrics=metrics),
        "responses": Responses(
            models, store, settings.limits, settings.conversations, wall_clock=wall_clock,
            default_seeds=lambda name: seeds.get(name, settings.model_defaults.seed), state=state,
        ),
        "stored_responses": StoredResponses(store),
        "input_items": InputItems(store),
        "conversations": Conversations(store, settings.conversations, wall_clock=wall_clock),
        "conversation": OneConversation(store),
        "conversation_items": ConversationItems(store, settings.conversations),
        "conversation_item": ConversationItem(store),
        "ui": Ui(UiAssets.load(), claimed_sha256=attestor.ui_sha256),
    }
    middleware: list[Middleware] = [
        RequestContext(metrics),
        BodyLimit(settings.limits.max_body_bytes, settings.server.body_timeout),
        ResponseSigning(identity),
        *([falcon.CORSMiddleware(allow_origins=settings.server.cors_origins, expose_headers=_CORS_EXPOSE)] if settings.server.cors_origins else []),
        Authentication(Auth(settings, metrics, clock=wall_clock)),
        *(extra_middleware or []),
        JsonBody(settings),
    ]
    app = falcon.App(middleware=middleware, request_type=falcon.Request)
    app.req_options.strip_url_path_trailing_slash = True
    app.resp_options.secure_cookies_by_default = True
    metrics.allow_routes(path for path, _, _ in ROUTES)
    for path, key, suffix in ROUTES:
        if suffix:
            app.add_route(path, resources[key], suffix=suffix)
        else:
            app.add_route(path, resources[key])
    # Falcon matches handlers by the exception's MRO, so its built-in HTTPError handler would win over
    # one for Exception: register ours for both, and every error leaves in the OpenAI shape.
    app.add_error_handler(Exception, handle_error)
    app.add_error_handler(falcon.HTTPError, handle_error)
    return app, state


def _measurer(attestor: Attestor, shared: SharedState | None) -> Callable[[str, str], None]:
    """What runs in the loading thread once a model's digest is known, before it serves: the runtime
    measurement, kept in the master's memory too so that it outlives this worker."""

    def measured(name: str, sha256_hex: str) -> None:
        attestor.measure_model(name, sha256_hex)
        if shared is not None and attestor.event_log:
            try:
                shared.measurements.replace(lambda: list(attestor.event_log))
            except StateFull as e:
                log.error("the runtime measurement log no longer fits its shared memory (%s): after a worker "
                          "restart it would not replay to the register", e)

    return measured
