"""The model list, and model management (load and unload; the admin scope off loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import falcon

from appliance.desired import StateFull
from appliance.engine.errors import UnknownModel
from appliance.web.errors import BadRequest, Conflict, Forbidden
from appliance.web.schemas import LoadModelRequest, UnloadModelRequest, parse
from appliance.web.state import AppState

__all__ = ["Models", "Admin"]


class Models:
    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
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


class Admin:
    """Model management; the trust layer restricts it to the admin scope off loopback."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def on_post_load(self, req: falcon.Request, resp: falcon.Response) -> None:
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
                desired.add(settings.model_copy(update={"sha256": rec.sha256}))  # a restart reloads these bytes or refuses
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

    def on_post_unload(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = parse(UnloadModelRequest, req.context.json)
        desired = self.state.desired
        try:
            rec = self.state.models.unload(body.model_name, timeout=self.state.settings.server.graceful_timeout)
        except UnknownModel:
            # A desired model that failed to load (or is still waiting for its turn after a restart):
            # unloading it is how the operator stops /readiness from waiting for it.
            if desired is not None and desired.remove(body.model_name):
                resp.media = {"status": "unloaded", "model": {"name": body.model_name}}
                return
            raise
        if desired is not None:
            desired.remove(rec.name)
        resp.media = {"status": "unloaded", "model": {"name": rec.name}}
