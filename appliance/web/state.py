"""What the resources of one worker share, built once by the app factory."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.desired import DesiredModels
from appliance.engine.registry import ModelRegistry
from appliance.evidence.attestor import Attestor
from appliance.metrics import Metrics
from appliance.settings import Settings
from appliance.trust.identity import Identity

__all__ = ["AppState"]


@dataclass
class AppState:
    """What the resources share; built once per worker."""

    settings: Settings
    models: ModelRegistry
    metrics: Metrics
    identity: Identity
    wall_clock: Callable[[], float] = time.time
    started: float = field(default_factory=time.time)
    attestor: Attestor | None = None
    desired: DesiredModels | None = None
    """The models to serve, kept by the gunicorn master across worker restarts (None in-process)."""
    stopping: bool = False
    """SIGTERM came: long-lived connections (WebSocket sessions) close once idle."""
