"""Liveness, readiness, metrics and status: what operators and orchestrators ask."""

from __future__ import annotations

import falcon

from appliance import __version__
from appliance.telemetry import filter_status
from appliance.web.errors import NotReady
from appliance.web.state import AppState

__all__ = ["Health", "Readiness", "Prometheus", "Status"]


class Health:
    """Liveness: answers from the event loop without touching any model."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class Readiness:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
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

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = self.state.metrics.render()


class Status:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = filter_status({
            "version": __version__,
            "uptime_seconds": round(self.state.wall_clock() - self.state.started, 3),
            "devices": self.state.models.devices(),
            "models": [r.status() for r in self.state.models.records()],
            "attestation": self.state.attestor.evidence_status() if self.state.attestor is not None else None,
        })
