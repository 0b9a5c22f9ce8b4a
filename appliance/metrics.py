"""Prometheus metrics, one registry per app. Labels are bounded: a model name (an operator's config or
`/load_model`), a route template, a method, a status, a reason or a cause from a fixed set; never
request data (spec/telemetry.md, enforced by appliance/telemetry.py)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from appliance.telemetry import MetricsPolicy

if TYPE_CHECKING:
    from appliance.desired import WorkerDeaths
    from appliance.engine.events import Finished
    from appliance.engine.registry import ModelRegistry

__all__ = ["Metrics"]

_M = TypeVar("_M", Counter, Histogram)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# The `<name>_created` series (a start time per labelled child) doubles the exposition for nothing a
# dashboard uses; Prometheus's own conventions leave it out. A process-wide switch in the client.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Counters and histograms updated by the app and the engines; gauges read from the registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "appliance_requests_total", "HTTP requests by route, method and status", ["route", "method", "status"], registry=r
        )
        self.errors = Counter("appliance_request_errors_total", "HTTP responses with status >= 400", ["route", "status"], registry=r)
        self.latency = Histogram(
            "appliance_request_duration_seconds", "Time to the response headers (streams: to the first byte)", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "appliance_time_to_first_token_seconds", "From submission to the first generated token", ["model"],
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "appliance_inter_token_latency_seconds", "Mean gap between a request's generated tokens, one observation "
            "per request of two tokens or more", ["model"], buckets=_ITL_BUCKETS, registry=r,
        )
        self.queue_time = Histogram(
            "appliance_request_queue_time_seconds", "From submission to a slot (waiting for a free slot)", ["model"],
            buckets=_QUEUE_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "appliance_e2e_request_latency_seconds", "From submission to the last generated token, for requests "
            "that finished (stop or length)", ["model"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.generated = Counter("appliance_generation_tokens_total", "Tokens generated", ["model"], registry=r)
        self.prompt = Counter("appliance_prompt_tokens_processed_total", "Prompt tokens decoded (cache hits excluded)", ["model"], registry=r)
        self.prompt_total = Counter("appliance_prompt_tokens_total", "Prompt tokens of finished requests (cached "
                                    "ones included)", ["model"], registry=r)
        self.prompt_cached = Counter("appliance_prompt_tokens_cached_total", "Prompt tokens of finished requests "
                                     "reused from a slot's KV cache", ["model"], registry=r)
        self.attestations = Counter(
            "appliance_attestation_requests_total", "GET /v1/attestation by evidence provider and status",
            ["provider", "status"], registry=r,
        )
        self.embedding = Counter("appliance_embedding_tokens_total", "Tokens embedded (POST /v1/embeddings)", ["model"],
                                 registry=r)
        self.streams = Counter(
            "appliance_streams_total", "Streamed responses, by who wrote their tokens: the event loop or the model's "
            "scheduler thread (server.stream_writes)", ["writer"], registry=r,
        )
        self.auth_failures = Counter("appliance_auth_failures_total", "Requests refused by authentication", ["reason"], registry=r)
        self._models: ModelRegistry | None = None
        self._policy = MetricsPolicy(())
        self._children: dict[tuple[Counter | Histogram, str], Any] = {}

    # EngineObserver, called from scheduler threads (prometheus_client is thread-safe)
    # The labelled children are looked up once per model: the scheduler reports after every decode
    # step, and labels() (validation, a lock, a dict) is most of an update's cost there.
    def first_token(self, model: str, seconds: float) -> None:
        self._child(self.ttft, model).observe(seconds)

    def tokens_generated(self, model: str, n: int) -> None:
        self._child(self.generated, model).inc(n)

    def prompt_tokens(self, model: str, n: int) -> None:
        self._child(self.prompt, model).inc(n)

    def embedding_tokens(self, model: str, n: int) -> None:
        self._child(self.embedding, model).inc(n)

    def request_finished(self, model: str, finished: Finished) -> None:
        self._child(self.queue_time, model).observe(finished.queued)
        self._child(self.e2e, model).observe(finished.e2e)
        if finished.itl is not None:
            self._child(self.itl, model).observe(finished.itl)
        self._child(self.prompt_total, model).inc(finished.prompt)
        self._child(self.prompt_cached, model).inc(finished.cached)

    def _child(self, metric: _M, model: str) -> _M:
        child: _M | None = self._children.get((metric, model))
        if child is None:
            child = self._children[(metric, model)] = metric.labels(model)
        return child

    def watch_models(self, models: ModelRegistry) -> None:
        """Expose queue depth, busy slots and loaded models, read from the registry at scrape time."""
        self._models = models
        self.registry.register(_ModelGauges(models))

    def watch_worker_restarts(self, deaths: WorkerDeaths) -> None:
        """Expose the worker restarts the gunicorn master counted (`desired.WorkerDeaths`, shared memory):
        a worker cannot count its own death, its successor exports it."""
        self.registry.register(_WorkerRestarts(deaths))

    def allow_routes(self, routes: Iterable[str]) -> None:
        """The route templates the app serves: the only values a `route` label may take (and "unmatched")."""
        self._policy = MetricsPolicy(routes)

    def render(self) -> bytes:
        """The exposition, less anything the telemetry policy does not allow (spec/telemetry.md)."""
        return generate_latest(_Filtered(self.registry, self._policy))


class _Filtered:
    def __init__(self, registry: CollectorRegistry, policy: MetricsPolicy) -> None:
        self._registry = registry
        self._policy = policy

    def collect(self) -> Iterator[Metric]:
        return self._policy.filter_families(self._registry.collect())


class _ModelGauges:
    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        queue = GaugeMetricFamily("appliance_queue_depth", "Requests waiting for a slot", labels=["model"])
        busy = GaugeMetricFamily("appliance_busy_slots", "Slots generating or processing a prompt", labels=["model"])
        slots = GaugeMetricFamily("appliance_slots", "Slots configured", labels=["model"])
        loaded = GaugeMetricFamily("appliance_models_loaded", "Models ready to serve")
        n = 0
        for rec in self._models.records():
            if rec.state == "ready" and rec.engine is not None:
                n += 1
                queue.add_metric([rec.name], rec.engine.queue_depth)
                busy.add_metric([rec.name], rec.engine.busy_slots)
                slots.add_metric([rec.name], rec.settings.parallel)
        loaded.add_metric([], n)
        yield from (queue, busy, slots, loaded)


class _WorkerRestarts:
    def __init__(self, deaths: WorkerDeaths) -> None:
        self._deaths = deaths

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        d = self._deaths.read()
        total = CounterMetricFamily(
            "appliance_worker_restarts", "Workers started again after the worker died (a signal, an exit, a timeout)"
        )
        total.add_metric([], d["restarts"])
        by_cause = CounterMetricFamily(
            "appliance_worker_restarts_by_cause", "Worker restarts by cause: the signal (SIGKILL, SIGSEGV, SIGILL...), "
            "exit_<code>, or timeout", labels=["cause"],
        )
        for cause, n in sorted(d["causes"].items()):
            by_cause.add_metric([cause], n)
        yield from (total, by_cause)
