"""Command-line verification, usable without the server installed.

    python -m attestation verify-response TRANSCRIPT.json --public-key B64
    python -m attestation verify URL [--policy FILE] [--allow-simulated] [--complete PROMPT] [--stream]
                                     [--model NAME] [--max-tokens N] [--api-key KEY] [--timeout S]

(`appliance-attestation ...`, the console script of this distribution, and `appliance verify-response` /
`appliance verify` of the server's CLI are the same commands.)

A transcript is the JSON document spec/signing.md defines: the request as the client sent it (with
its `Content-Digest`, if it sent one) and the response as it arrived (status, headers, body bytes in
base64). Exit 0 when it verifies, 1 with the reason on stderr when it does not, 2 when the
transcript cannot be read.

`verify` attests the appliance at URL (spec/attestation.md): it prints the factor table and exits 0
only when no required factor failed, 1 when one did (or, with `--complete`, when the answer does not
verify against the attested key), 2 for usage errors, an unreadable policy, or an unreachable URL.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .signing import (
    RequestInfo,
    VerificationError,
    VerifiedResponse,
    VerifiedStream,
    public_key_from_b64,
    verify_response,
    verify_stream,
)

if TYPE_CHECKING:
    from .client import AttestedAppliance, StdlibHTTP
    from .verify import VerificationReport

__all__ = ["load_transcript", "verify_transcript", "verify_transcript_main", "add_verify_arguments", "verify_main", "main"]


class TranscriptError(ValueError):
    pass


def load_transcript(path: Path) -> tuple[RequestInfo, int, dict[str, str], bytes]:
    try:
        doc = json.loads(Path(path).read_text())
        req, resp = doc["request"], doc["response"]
        digest = req.get("content_digest")  # the request's Content-Digest, when it sent one
        if digest is not None and not isinstance(digest, str):
            raise TypeError("content_digest")
        info = RequestInfo(
            req["method"], req["target"], base64.b64decode(req.get("body_b64", ""), validate=True), req.get("nonce"), digest
        )
        headers = {str(k): str(v) for k, v in resp["headers"].items()}
        return info, int(resp["status"]), headers, base64.b64decode(resp.get("body_b64", ""), validate=True)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise TranscriptError(f"cannot read transcript {path}: {type(e).__name__}") from None


def verify_transcript(path: Path, public_key_b64: str) -> VerifiedResponse | VerifiedStream:
    """Verify a saved response or stream; raises VerificationError naming what failed."""
    info, status, headers, body = load_transcript(path)
    key = public_key_from_b64(public_key_b64)
    ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if ctype.startswith("text/event-stream"):
        return verify_stream(key, request=info, status=status, headers=headers, transcript=body)
    return verify_response(key, request=info, status=status, headers=headers, body=body)


def verify_transcript_main(path: Path, public_key_b64: str) -> int:
    try:
        result = verify_transcript(path, public_key_b64)
    except TranscriptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    print(f"OK: signed by {result.key_id} at {result.created}")
    return 0


# ---------------------------------------------------------------------------------------------
# verify: attest an appliance, optionally send it a completion and verify the answer

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_verify_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("url", help="the appliance's base URL, e.g. http://127.0.0.1:3000")
    p.add_argument("--policy", type=Path, default=None, help="policy file (TOML or JSON, or a build manifest)")
    p.add_argument(
        "--allow-simulated", action="store_true",
        help="accept SIMULATED evidence (no TEE: for development only)",
    )
    p.add_argument("--complete", metavar="PROMPT", default=None, help="then send this completion and verify the answer")
    p.add_argument("--stream", action="store_true", help="with --complete: stream the answer (verified as it arrives)")
    p.add_argument("--model", default=None, help="with --complete: the model (default: the first model in the claims)")
    p.add_argument("--max-tokens", type=int, default=16, help="with --complete: max_tokens (default 16)")
    p.add_argument("--api-key", default=None, help="with --complete: API key (sent as a Bearer token)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request (default 120)")
    p.add_argument(
        "--attested-tls", action="store_true",
        help="https with the appliance's self-signed certificate: trust the TLS key the attestation names, no CA",
    )
    return p


def _http(timeout: float, attested_tls: bool = False) -> StdlibHTTP:
    """The HTTP client the command uses (the standard library's); tests replace it."""
    from .client import StdlibHTTP

    return StdlibHTTP(timeout=timeout, attested_tls=attested_tls)


def verify_main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    from .client import AttestationFailed, attest, normalize_base_url
    from .policy import Policy, PolicyError, load_policy

    if args.max_tokens is not None and args.max_tokens < 1:
        print("error: --max-tokens must be at least 1", file=err)
        return EXIT_USAGE
    try:
        base = normalize_base_url(args.url)
    except ValueError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    try:
        policy = load_policy(args.policy) if args.policy is not None else Policy()
    except PolicyError as e:
        print(f"error: {e}", file=err)
        return EXIT_USAGE
    if args.allow_simulated:
        policy = policy.with_simulated()
    attested_tls = bool(getattr(args, "attested_tls", False))
    http = _http(args.timeout, attested_tls) if attested_tls else _http(args.timeout)

    print(f"appliance: {base}", file=out)
    try:
        appliance = attest(base, policy=policy, http=http)
    except AttestationFailed as e:
        _print_report(e.report, out)
        print(f"result: FAILED ({', '.join(f.name for f in e.report.failures()) or 'no factor passed'})", file=out)
        return EXIT_FAILED
    except _io_errors() as e:
        print(f"error: cannot reach {base}: {type(e).__name__}: {e}", file=err)
        return EXIT_USAGE
    _print_report(appliance.report, out)
    if attested_tls:
        pin = appliance.claims.get("tls_public_key_sha256")
        if not pin:
            print("result: FAILED (--attested-tls, but the appliance attests no TLS key)", file=out)
            return EXIT_FAILED
        http.pin_spki_sha256 = pin  # from here on, every connection must present the attested key
    print(f"result: OK (signing key {appliance.kid})", file=out)
    if args.complete is None:
        return EXIT_OK
    return _complete(appliance, args, http, out, err)


def _io_errors() -> tuple[type[BaseException], ...]:
    """Network failures (connection refused, TLS, timeouts, malformed HTTP): exit 2, not a verdict."""
    import http.client

    errors: tuple[type[BaseException], ...] = (OSError, http.client.HTTPException)
    try:
        import httpx2

        errors += (httpx2.TransportError,)
    except ImportError:
        pass
    return errors


def _print_report(report: VerificationReport, out: TextIO) -> None:
    if report.provider or report.format:
        print(f"provider: {report.provider} ({report.format})", file=out)
    print(report.table(), file=out)


def _complete(
    appliance: AttestedAppliance, args: argparse.Namespace, http: StdlibHTTP, out: TextIO, err: TextIO
) -> int:
    import json as _json

    from .client import VerificationError, verified_request

    model = args.model or next(iter(appliance.models), None)
    if model is None:
        print("error: the claims name no model; pass --model", file=err)
        return EXIT_USAGE
    payload = {"model": model, "prompt": args.complete, "max_tokens": args.max_tokens}
    if args.stream:
        payload["stream"] = True
    body = _json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream" if args.stream else "application/json"}
    if args.api_key:
        headers["Authorization"] = f"Bearer {args.api_key}"
    print(f"completion: POST /v1/completions (model {model}, max_tokens {args.max_tokens}{', streamed' if args.stream else ''})", file=out)
    try:
        resp = verified_request(appliance, "POST", "/v1/completions", body=body, headers=headers, http=http)
        if resp.is_stream:
            text, error = [], None
            for ev in resp.events():
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]\n\n":
                    continue
                obj = _json.loads(ev[6:])
                if "error" in obj:
                    error = obj["error"].get("message")
                for choice in obj.get("choices") or []:
                    text.append(choice.get("text") or "")
            result = resp.stream_result() if resp.stream_result else None
            status_line = f"signature: verified (stream, {len(result.events) if result else 0} events, final checkpoint ok)"
        else:
            obj = resp.json()
            error = obj.get("error", {}).get("message") if resp.status != 200 else None
            text = [c.get("text") or "" for c in obj.get("choices") or []]
            status_line = "signature: verified"
    except VerificationError as e:
        print(f"signature: FAILED: {e}", file=out)
        return EXIT_FAILED
    except _io_errors() as e:
        print(f"error: the completion request failed: {type(e).__name__}: {e}", file=err)
        return EXIT_USAGE
    except (ValueError, AttributeError, TypeError) as e:
        print(f"signature: verified, but the answer is not a completion ({type(e).__name__})", file=out)
        return EXIT_FAILED
    if resp.status != 200 or error:
        print(f"{status_line}; the appliance answered HTTP {resp.status}: {error}", file=out)
        return EXIT_FAILED
    print("".join(text), file=out)
    print(status_line, file=out)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attestation")
    sub = p.add_subparsers(dest="command", required=True)
    vr = sub.add_parser("verify-response", help="verify a saved response or stream transcript")
    vr.add_argument("transcript", type=Path)
    vr.add_argument("--public-key", required=True)
    add_verify_arguments(sub.add_parser("verify", help="attest an appliance (and verify a completion)"))
    args = p.parse_args(argv)
    if args.command == "verify":
        return verify_main(args)
    return verify_transcript_main(args.transcript, args.public_key)
