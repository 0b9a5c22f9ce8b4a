"""Configuration: declared once, validated at boot, every error names its key.

Sources, lowest precedence first: built-in defaults, the TOML file (`--config`), command-line flags.
Invalid configuration raises `ConfigError` before anything binds a port; the CLI exits 2 with it.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "ConfigError",
    "ApiKey",
    "ClientKey",
    "AuthSettings",
    "ModelPolicy",
    "AttestationSettings",
    "ModelDefaults",
    "ModelSettings",
    "ServerSettings",
    "LimitsSettings",
    "ConversationSettings",
    "Settings",
    "load_settings",
    "default_threads",
]


class ConfigError(Exception):
    """Configuration is invalid; the message names the offending key."""


def default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may run on (oversubscription collapses throughput)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelDefaults(_Strict):
    """Per-model settings; `[model_defaults]` applies them to every model unless a model overrides."""

    n_ctx: Annotated[int, Field(ge=64, le=1 << 20)] = 4096
    """Context per slot: the most tokens (prompt + completion) one request can use."""
    parallel: Annotated[int, Field(ge=1, le=256)] = 4
    """Slots: sequences decoded together in one batch (continuous batching)."""
    n_batch: Annotated[int, Field(ge=32, le=1 << 16)] = 512
    n_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    """Threads for generation; default: the CPUs in this process's affinity mask."""
    n_threads_batch: Annotated[int, Field(ge=1, le=1024)] | None = None
    n_gpu_layers: Annotated[int, Field(ge=-1)] = 0
    """Layers offloaded to the GPU (-1: all); needs the CUDA variant."""
    seed: Annotated[int, Field(ge=0, lt=1 << 32)] | None = None
    """Seed for requests that give none; unset means a fresh random seed per request."""
    chat_template: str | None = None
    """Chat template overriding the one in the GGUF metadata: Jinja text, or a llama.cpp built-in name
    ("gemma", "llama3", "chatml", ...)."""
    max_queue: Annotated[int, Field(ge=0, le=100_000)] = 64
    """Requests waiting for a slot before new ones get 503 with Retry-After."""
    use_mmap: bool | None = None
    """Map the model file from disk (true: the operator vouches for the disk), or read it once into
    sealed memory and load that copy (false). Unset: false whenever an attestation provider is active
    (the default, `auto`, simulated included), true only with `[attestation] provider = "none"`.
    /status and the claims report it; a verifier's default policy refuses a mapped model."""
    flash_attn: Literal["auto", "on", "off"] = "auto"
    cache_ram_mib: Annotated[int, Field(ge=0, le=1 << 20)] = 512
    """Host memory (MiB) for KV cells copied out of a slot before another request takes it, so that a
    conversation's next turn skips its cached prefix even after its slot served others (as
    llama-server's --cache-ram). Least recently used out first; 0 turns it off. Counted in the memory
    check at load."""
    embeddings: bool = False
    """Serve POST /v1/embeddings from this model: a second llama context (pooled, its own thread)
    beside the generation one; an input is at most n_batch tokens."""
    pooling: Literal["mean", "cls", "last", "rank"] | None = None
    """How an input's token states become one vector; unset: what the GGUF declares, else mean. `rank`
    makes the model a reranker (POST /v1/rerank; it needs a classification head), whatever `embeddings` says."""


class ModelSettings(ModelDefaults):
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")]
    path: Path
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    """The file's expected sha256: a load of other bytes is refused. Unset, the first load pins the
    digest it read, so a worker restart never serves a file that changed on disk since."""


def cpu_backends() -> list[str]:
    """The CPU backend builds next to libllama (libggml-cpu-<level>.so), found without loading it."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    lib = Path(spec.submodule_search_locations[0]) / "lib"
    return sorted(p.name[len("libggml-cpu-") : -len(".so")] for p in lib.glob("libggml-cpu-*.so"))


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 3000
    graceful_timeout: Annotated[int, Field(ge=1, le=3600)] = 30
    """Seconds SIGTERM waits for in-flight requests before the worker is stopped."""
    worker_timeout: Annotated[int, Field(ge=0, le=3600)] = 60
    keepalive: Annotated[int, Field(ge=0, le=300)] = 5
    """Seconds an idle keep-alive connection is kept, and the most a request's line and headers may
    take to arrive (a slow sender is cut off)."""
    websocket_idle_timeout: Annotated[int, Field(ge=0, le=86400)] = 300
    """Seconds a WebSocket connection (GET /v1/responses) may stay without a message before it is closed
    (1000, "idle"); 0 keeps it open."""
    body_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0
    """Seconds a request's body may take to arrive; slower gets a 408 (a slow body holds a connection)."""
    worker_connections: Annotated[int, Field(ge=1, le=100_000)] = 4096
    """Connections served at once, idle keep-alive ones included; past it, a new connection waits for
    one to close (at most `keepalive` seconds). The open-file limit is raised to fit at start."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    access_log: bool = True
    cors_origins: list[str] = []
    """Origins allowed by CORS; empty (the default) sends no CORS headers at all."""
    tls: Literal["off", "attested"] = "off"
    """attested: HTTPS with a key and certificate made in memory at boot, its public key in the claims."""
    stream_writes: Literal["auto", "scheduler", "event_loop"] = "auto"
    """Who writes a streamed token to the client: the event loop, while the next decode runs, or the
    model's scheduler thread, between two decodes (no turn of the event loop per token). auto: the
    scheduler thread when a model's decode threads take every CPU this process may use. Plain HTTP
    only: with tls = "attested" the event loop writes."""
    cpu_backend: Annotated[str, Field(pattern=r"^[a-z0-9_.]+$", max_length=32)] = "auto"
    """Which build of llama.cpp's CPU backend to load: auto (the best this CPU runs) or a level such
    as haswell (x86-64-v3), skylakex, icelake, zen4, sapphirerapids: to pin one across a fleet
    whose CPUs differ (results can differ in the last bits between builds) or to compare them."""

    @field_validator("cpu_backend")
    @classmethod
    def _known_cpu_backend(cls, v: str) -> str:
        if v == "auto":
            return v
        available = cpu_backends()
        if available and v not in available:
            raise ValueError(f"no CPU backend build '{v}'; this build has: auto, {', '.join(available)}")
        return v

    @model_validator(mode="after")
    def _stream_writes_need_plain_http(self) -> ServerSettings:
        if self.stream_writes == "scheduler" and self.tls != "off":
            raise ValueError('stream_writes: "scheduler" writes to plain sockets only; it needs tls = "off"')
        return self

    @property
    def loopback(self) -> bool:
        import ipaddress

        host = self.host.strip("[]")
        if host == "localhost":
            return True
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False


Scope = Literal["inference", "admin", "metrics"]
"""inference: the API; admin: model management and /metrics; metrics: /metrics only (a scraper's key)."""


class ApiKey(_Strict):
    """An API key, configured only as the SHA-256 of the key (hex): the key itself is never stored."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    scopes: Annotated[list[Scope], Field(min_length=1)] = ["inference"]


class ClientKey(_Strict):
    """A client's Ed25519 public key for RFC 9421 request signatures."""

    keyid: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._@:/+=-]+$")]
    public_key: str
    """The raw 32-byte public key, base64 (standard or url-safe)."""
    scopes: Annotated[list[Scope], Field(min_length=1)] = ["inference"]

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, v: str) -> str:
        import base64
        import binascii

        try:
            raw = base64.b64decode(v + "=" * (-len(v) % 4), altchars=b"-_" if ("-" in v or "_" in v) else None, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
        if len(raw) != 32:
            raise ValueError("must be a raw 32-byte Ed25519 public key")
        return v


class AuthSettings(_Strict):
    api_keys: list[ApiKey] = []
    client_keys: list[ClientKey] = []
    open_inference: bool = False
    """Serve inference without credentials on a non-loopback bind (admin routes stay closed)."""
    require_signed_requests: bool = False
    """Every non-public request must carry a valid RFC 9421 signature from a configured client key."""
    signature_window: Annotated[int, Field(ge=1, le=3600)] = 300
    """Seconds: the most a request signature may live (expires - created) and its allowed clock skew."""
    replay_cache_size: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000

    @model_validator(mode="after")
    def _consistent(self) -> AuthSettings:
        if self.require_signed_requests and not self.client_keys:
            raise ValueError("require_signed_requests needs at least one entry in auth.client_keys")
        names = [k.name for k in self.api_keys] + [k.keyid for k in self.client_keys]
        if len(names) != len(set(names)):
            raise ValueError("api key names and client key ids must be unique")
        return self

    @property
    def keys_configured(self) -> bool:
        return bool(self.api_keys or self.client_keys)


class ModelPolicy(_Strict):
    dirs: list[Path] = []
    """Directories `POST /load_model` may load from (symlinks resolved; nothing outside them)."""
    allowed_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = []
    """When set, only model files with one of these digests load (403 for others)."""


class AttestationSettings(_Strict):
    provider: Literal["auto", "configfs-tsm", "nitro", "gramine-sgx", "simulated", "none"] = "auto"
    """auto: the first TEE interface present, else simulated evidence (which verifiers refuse by default)."""
    configfs_root: Path = Path("/sys/kernel/config/tsm/report")
    nsm_device: Path = Path("/dev/nsm")
    gramine_root: Path = Path("/dev/attestation")
    rtmr_path: Path = Path("/sys/devices/virtual/misc/tdx_guest/measurements/rtmr3:sha384")
    rate_per_minute: Annotated[int, Field(ge=0, le=100_000)] = 60
    """Attestation requests per minute per client address (0: unlimited)."""
    seal_after_startup: bool = False
    """Nitro: lock PCR16 once the configured models are loaded, so the attestation document lists it
    (an NSM reports only locked PCRs); models loaded later can then no longer be measured."""
    variant: Literal["cpu", "cuda"] | None = None
    """Reported in the claims; default: detected from the llama.cpp build."""


class LimitsSettings(_Strict):
    max_body_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 1 << 20
    max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 8192
    """Upper bound for a request's max_tokens."""
    default_max_tokens: Annotated[int, Field(ge=1, le=1 << 20)] = 16
    """OpenAI's default for /v1/completions; chat defaults to the rest of the context."""
    max_prompt_tokens: Annotated[int, Field(ge=0, le=1 << 20)] = 0
    """Upper bound on a prompt's tokens (0: only the model's context bounds it)."""
    max_stop: Annotated[int, Field(ge=0, le=64)] = 8
    max_stop_length: Annotated[int, Field(ge=1, le=4096)] = 256
    max_json_depth: Annotated[int, Field(ge=2, le=512)] = 32
    max_top_logprobs: Annotated[int, Field(ge=0, le=100)] = 20
    load_timeout: Annotated[float, Field(gt=0, le=86400)] = 600.0
    rate_per_minute_per_key: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Requests per minute per API key or client key (0: unlimited)."""
    rate_per_minute_per_ip: Annotated[int, Field(ge=0, le=1_000_000)] = 0
    """Requests per minute per client address (0: unlimited)."""
    rate_burst: Annotated[int, Field(ge=1, le=100_000)] = 20

    @model_validator(mode="after")
    def _consistent(self) -> LimitsSettings:
        if self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens exceeds max_tokens")
        return self


class ConversationSettings(_Strict):
    """`[conversations]`: what POST /v1/responses (`store`, `previous_response_id`) and the Conversations
    API keep on the server, sealed (AES-256-GCM, a key that exists only in memory; README)."""

    max_responses: Annotated[int, Field(ge=1, le=10_000_000)] = 10_000
    """Stored responses; past it, the least recently written one is evicted."""
    max_conversations: Annotated[int, Field(ge=1, le=10_000_000)] = 1_000
    """Conversations; past it, the least recently written one is evicted."""
    max_items_per_conversation: Annotated[int, Field(ge=1, le=1_000_000)] = 1_000
    """Items one conversation may hold; adding past it is a 400 naming `conversation` (or `items`)."""
    ttl_seconds: Annotated[int, Field(ge=1, le=10 * 365 * 86400)] = 30 * 86400
    """A record is forgotten this long after it was last written (OpenAI keeps responses 30 days)."""
    memory_budget_bytes: Annotated[int, Field(ge=1 << 16, le=1 << 40)] = 64 << 20
    """The sealed bytes of every record together; past it, the least recently written records go."""
    directory: Path | None = None
    """Also keep the sealed records on disk here (created 0700 if missing; absolute), so they outlive a
    worker restart: one file per record, in a subdirectory named by the sealing key's id. The key never
    touches the disk, so a full restart (a new key) cannot open them: its subdirectory is left for the
    operator to delete (several processes may share the directory, each with its own key)."""

    @field_validator("directory")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        if v is not None and not v.is_absolute():
            raise ValueError("must be an absolute path")
        return v


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    model_defaults: ModelDefaults = ModelDefaults()
    models: list[ModelSettings] = []
    auth: AuthSettings = AuthSettings()
    model_policy: ModelPolicy = ModelPolicy()
    attestation: AttestationSettings = AttestationSettings()
    conversations: ConversationSettings = ConversationSettings()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        seen: set[str] = set()
        for i, m in enumerate(models):
            if m.name in seen:
                raise ValueError(f"duplicate model name '{m.name}' at models[{i}]")
            seen.add(m.name)
        return models

    @model_validator(mode="after")
    def _safe_bind(self) -> Settings:
        # The seed's open, keyless API is only acceptable where nobody else can reach it.
        if not self.server.loopback and not self.auth.keys_configured and not self.auth.open_inference:
            raise ValueError(
                f"auth: bound to {self.server.host}, off loopback, with no keys: configure auth.api_keys or "
                "auth.client_keys, or set auth.open_inference = true"
            )
        return self

    def public_digest(self) -> str:
        """SHA-256 of the effective configuration, secrets excluded (API key digests dropped)."""
        import hashlib
        import json

        data = self.model_dump(mode="json")
        for key in data["auth"]["api_keys"]:
            key.pop("sha256", None)
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def model_settings(self, name: str, path: Path | str, **overrides: Any) -> ModelSettings:
        """Settings for a model added at run time (CLI `--model`, `POST /load_model`)."""
        base = self.model_defaults.model_dump()
        base.update(overrides)
        return ModelSettings(name=name, path=Path(path), **base)


def _key(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _format(err: ValidationError) -> str:
    return "; ".join(
        (f"{_key(e['loc'])}: " if e['loc'] else "") + e['msg'].removeprefix('Value error, ') for e in err.errors()
    )


def load_settings(
    config_file: Path | str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    models: list[tuple[str, str]] | None = None,
) -> Settings:
    """Build settings from the TOML file and command-line overrides; raise ConfigError naming the key."""
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            with open(config_file, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"--config: no such file: {config_file}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"--config: {config_file} is not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"--config: cannot read {config_file}: {e.strerror}") from None
    server = dict(data.get("server") or {})
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if server:
        data["server"] = server
    try:
        settings = Settings.model_validate(data)
        if models:
            extra = [settings.model_settings(n, p) for n, p in models]
            settings = Settings.model_validate(
                {**settings.model_dump(), "models": [*settings.model_dump()["models"], *[m.model_dump() for m in extra]]}
            )
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
    return settings
