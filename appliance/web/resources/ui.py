"""The web chat: `GET /` (the page) and `GET /ui/{name}` (its assets), public.

The assets are the built files in appliance/web/ui/ (sources in ui/), listed with their SHA-256 in
`manifest.json`, whose own SHA-256 is the `ui_sha256` claim. They are read once, at worker start,
checked against the manifest, and served from memory: what is served is what the claims name, whatever
happens to the files afterwards. The page gets a strict Content-Security-Policy (no inline script or
style; index.html loads app.js and app.css with Subresource Integrity).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import falcon

from appliance.web.errors import NotFound

__all__ = ["UiAssets", "Ui", "ASSET_DIR", "PAGE_CSP"]

log = logging.getLogger("appliance.http")

ASSET_DIR = Path(__file__).resolve().parents[1] / "ui"
MANIFEST = "manifest.json"
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
}


@dataclass(frozen=True)
class UiAssets:
    """The manifest's bytes and every file it lists, each checked against its digest."""

    manifest: bytes
    files: dict[str, bytes]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.manifest).hexdigest()

    @classmethod
    def load(cls, directory: Path = ASSET_DIR) -> UiAssets | None:
        """None (and an error logged) when the build is missing or a file differs from the manifest:
        the appliance then serves no UI rather than one its claims do not name."""
        try:
            manifest = (directory / MANIFEST).read_bytes()
            listed = json.loads(manifest)["files"]
            files: dict[str, bytes] = {}
            for name, entry in listed.items():
                if "/" in name or name.startswith(".") or Path(name).suffix not in _TYPES:
                    raise ValueError(f"unexpected file name {name!r}")
                data = (directory / name).read_bytes()
                if not hmac.compare_digest(hashlib.sha256(data).hexdigest(), str(entry["sha256"])):
                    raise ValueError(f"{name} does not match the manifest")
                files[name] = data
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("web UI not served: %s", e)
            return None
        return cls(manifest, files)


class Ui:
    """`on_get`: the page; `on_get_asset`: a file the manifest lists, or the manifest itself."""

    def __init__(self, assets: UiAssets | None, *, claimed_sha256: str | None = None) -> None:
        # The claims name the manifest the attestor read; serve nothing if this copy differs from it.
        if assets is not None and claimed_sha256 is not None and not hmac.compare_digest(assets.sha256, claimed_sha256):
            log.error("web UI not served: its manifest changed between reads")
            assets = None
        self.assets = assets

    def _send(self, resp: falcon.Response, name: str) -> None:
        if self.assets is None:
            raise NotFound("The web UI is not available on this appliance")
        data = self.assets.manifest if name == MANIFEST else self.assets.files.get(name)
        if data is None:
            raise NotFound("No such UI file")
        resp.content_type = _TYPES[Path(name).suffix]
        resp.data = data
        if name == "index.html":
            resp.set_header("Content-Security-Policy", PAGE_CSP)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "index.html")

    def on_get_asset(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        self._send(resp, name)
