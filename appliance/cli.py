"""`appliance [serve] [-p PORT] [--host HOST] [--config FILE.toml] [--model NAME=PATH]...`

Configuration is validated, and every configured model file checked, before anything binds a port:
an invalid configuration exits 2 with a message naming the key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import __version__

if TYPE_CHECKING:
    from wsgiref.types import WSGIApplication

    from appliance.desired import SharedState
    from appliance.settings import Settings
    from appliance.trust.identity import Identity
    from appliance.web.state import AppState

__all__ = ["main", "build_parser"]

EXIT_CONFIG = 2
EXIT_TAMPERED = 3  # the frozen binary's extracted files are not the ones it was built with


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="Hardened llama.cpp inference server.")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="serve the HTTP API (the default command)")
    for parser in (p, serve):
        parser.add_argument("-p", "--port", type=int, default=None, help="port (default 3000)")
        parser.add_argument("--host", default=None, help="address to bind (default 127.0.0.1)")
        parser.add_argument("--config", type=Path, default=None, help="TOML configuration file")
        parser.add_argument(
            "--model", action="append", type=_model_arg, default=None, metavar="NAME=PATH",
            help="serve a GGUF model under NAME (repeatable)",
        )
        parser.add_argument(
            "--no-default-model", action="store_true", default=None,
            help="do not serve the model embedded in the binary (a frozen build's default model)",
        )
    vr = sub.add_parser(
        "verify-response",
        help="verify a saved response or stream transcript against the appliance's public key",
    )
    vr.add_argument("transcript", type=Path, help="JSON transcript (see spec/signing.md)")
    vr.add_argument("--public-key", required=True, help="raw Ed25519 public key, base64 (from /v1/keys)")
    from attestation.cli import add_verify_arguments

    add_verify_arguments(sub.add_parser("verify", help="attest an appliance: print the factor table (see spec/attestation.md)"))
    hc = sub.add_parser("health", help="GET a health URL; exit 0 on 200, else 1 (container healthchecks: images have no curl)")
    hc.add_argument("url", nargs="?", default="http://127.0.0.1:3000/health")
    hc.add_argument("--timeout", type=float, default=5.0)
    return p


def _health(url: str, timeout: float) -> int:
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        print(f"appliance health: not an http(s) URL: {url}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            ok = r.status == 200
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"appliance health: {url}: {e}", file=sys.stderr)
        return 1
    return 0 if ok else 1


def _cap_malloc_arenas(arenas: int = 2) -> None:
    """glibc gives threads that allocate at once arenas of their own, up to 8 per CPU, and an arena
    keeps the pages its freed blocks leave behind: under a steady mix of requests (the scheduler and
    embedder threads, the hub's pool threads, a model loading beside them) the worker's RSS crept up
    by ~8 MiB a minute in the soak (issue 21). Two arenas hold it (README, "Abuse and faults").
    MALLOC_ARENA_MAX, where set, is glibc's own and wins. Set before any thread starts, so the
    worker, forked from this process, has it too."""
    if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        # This process's own symbols (dlopen(NULL)), as engine/memory.py's malloc_trim: find_library would
        # run ldconfig in a subprocess at every start.
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, arenas)  # M_ARENA_MAX (malloc.h)
    except (OSError, AttributeError):  # not glibc (musl has no arenas to cap)
        pass


def _serve(args: argparse.Namespace) -> int:
    from appliance.engine.errors import LoadRefused
    from appliance.engine.modelfile import check_gguf
    from appliance.settings import ConfigError, load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port, models=args.model)
        embedded = None if args.no_default_model else _embedded_model()
        if embedded and embedded[0] not in {m.name for m in settings.models}:
            models = [embedded, *(args.model or [])]
            settings = load_settings(args.config, host=args.host, port=args.port, models=models)
        for i, m in enumerate(settings.models):
            try:
                check_gguf(m.path)
            except LoadRefused as e:
                raise ConfigError(f"models[{i}].path: {e.message} ({m.path})") from None
    except ConfigError as e:
        print(f"appliance: invalid configuration: {e}", file=sys.stderr)
        return EXIT_CONFIG

    # OpenMP keeps libgomp's default (spin, then sleep): the scheduler never decodes while the event
    # loop still has the last step's tokens to send, so spinning barriers are not preempted by our own
    # Python work. On hosts with noisy neighbours, OMP_WAIT_POLICY=passive trades peak speed for
    # stability (README "How it works"); libgomp reads it when llama.cpp loads, after the fork.

    # numpy's OpenBLAS starts a thread per CPU that spins after each call; the appliance never uses
    # BLAS (llama.cpp does the math), and those threads took ~2% of the CPU from llama.cpp's own
    # (perf, single stream). One thread: no pool. Read when numpy loads, after the fork.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _cap_malloc_arenas()

    from appliance.buildinfo import verify_bundle
    from appliance.logs import configure_logging
    from appliance.web.server import ApplianceServer

    configure_logging(settings.server.log_level)
    try:
        # The frozen binary: what its bootloader extracted to TMPDIR is what was built, before the
        # worker loads any of it (llama.cpp's libraries load after the fork).
        checked = verify_bundle()
    except RuntimeError as e:
        logging.getLogger("appliance").error("refusing to start: %s", e)
        return EXIT_TAMPERED
    if checked:
        logging.getLogger("appliance").info("%d extracted files match this binary's build", checked)
    ApplianceServer(settings, _factory).run()
    return 0


def _embedded_model() -> tuple[str, str] | None:
    """(name, path) of the model a frozen binary carries (build/appliance.spec), else None.

    It is served like a `--model` (same digest in /status and the claims), read once from the onefile
    extraction directory into sealed memory when it loads; a configured model of the same name wins.
    """
    root = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or root is None:
        return None
    found = sorted(Path(root, "embedded_model").glob("*.gguf"))
    return (found[0].stem, str(found[0])) if found else None


def _factory(
    settings: Settings, identity: Identity, tls_public_key_sha256: str | None = None, shared: SharedState | None = None
) -> tuple[WSGIApplication, AppState]:
    # Imported in the worker after the fork: llama.cpp (and OpenMP/CUDA) never load in the master.
    from appliance.web.app import create_app

    return create_app(settings, identity=identity, tls_public_key_sha256=tls_public_key_sha256, shared=shared)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    finally:
        _flush_or_drop_std_streams()


def _flush_or_drop_std_streams() -> None:
    """Where stdout or stderr cannot be written (a full disk: ENOSPC, a closed pipe), what is still
    buffered is dropped here: otherwise the interpreter's last flush fails at exit and turns a clean
    shutdown's status into 120. Log lines that cannot be written are lost, never the exit status."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in (None, "serve"):
        return _serve(args)
    if args.command == "verify-response":
        from attestation.cli import verify_transcript_main

        return verify_transcript_main(args.transcript, args.public_key)
    if args.command == "verify":
        from attestation.cli import verify_main

        return verify_main(args)
    if args.command == "health":
        return _health(args.url, args.timeout)
    return 2


if __name__ == "__main__":
    sys.exit(main())
