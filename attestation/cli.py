"""Command-line verification, usable without the server installed.

    python -m attestation verify-response TRANSCRIPT.json --public-key B64

A transcript is the JSON document spec/signing.md defines: the request as the client sent it and
the response as it arrived (status, headers, body bytes in base64). Exit 0 when it verifies, 1 with
the reason on stderr when it does not, 2 when the transcript cannot be read.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import sys
from pathlib import Path

from .signing import RequestInfo, VerificationError, public_key_from_b64, verify_response, verify_stream

__all__ = ["load_transcript", "verify_transcript", "verify_transcript_main", "main"]


class TranscriptError(ValueError):
    pass


def load_transcript(path: Path) -> tuple[RequestInfo, int, dict[str, str], bytes]:
    try:
        doc = json.loads(Path(path).read_text())
        req, resp = doc["request"], doc["response"]
        info = RequestInfo(
            req["method"], req["target"], base64.b64decode(req.get("body_b64", ""), validate=True), req.get("nonce")
        )
        headers = {str(k): str(v) for k, v in resp["headers"].items()}
        return info, int(resp["status"]), headers, base64.b64decode(resp.get("body_b64", ""), validate=True)
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as e:
        raise TranscriptError(f"cannot read transcript {path}: {type(e).__name__}") from None


def verify_transcript(path: Path, public_key_b64: str):
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="attestation")
    sub = p.add_subparsers(dest="command", required=True)
    vr = sub.add_parser("verify-response")
    vr.add_argument("transcript", type=Path)
    vr.add_argument("--public-key", required=True)
    args = p.parse_args(argv)
    return verify_transcript_main(args.transcript, args.public_key)
