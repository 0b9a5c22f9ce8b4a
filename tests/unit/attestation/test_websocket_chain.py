"""spec/signing.md §8 without sockets: a signed 101, frames chained both ways, checkpoints and finals,
and the client's WebSocketVerifier refusing every kind of tampering."""

from __future__ import annotations

import datetime
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attestation import signing as s

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
KID = s.key_id(KEY.public_key().public_bytes_raw())
UPGRADE = s.RequestInfo("GET", "/v1/responses", b"")


def _session(creates: list[bytes], events_per_response: int = 3):
    """(101 headers, frames the server sent, frames the client sent), as the appliance makes them."""
    headers = {"content-type": "application/json", "x-request-id": "r1", s.STREAM_HEADER: s.WS_SCHEME}
    headers |= {k.lower(): v for k, v in s.sign_response_headers(
        KEY, KID, request=UPGRADE, status=101, headers=headers, body=None,
        created=datetime.datetime.fromtimestamp(1_800_000_000, tz=datetime.UTC), nonce="n1",
    ).items()}
    chain = s.WebSocketChain(headers["signature"])
    out: list[bytes] = []
    for i, create in enumerate(creates):
        chain.took(create)
        for j in range(events_per_response):
            frame = json.dumps({"type": "response.output_text.delta", "sequence_number": j, "delta": f"w{i}{j}"}).encode()
            chain.sent(frame)
            out.append(frame)
            if chain.server.seq in (1, 4):
                out.append(json.dumps({"type": "appliance.checkpoint", "checkpoint": chain.checkpoint_fields(KEY)}).encode())
        final = chain.signed_final(KEY, UPGRADE, "stop", {"output_tokens": events_per_response}, (b"\x01" * 32, b"\x02" * 32))
        out.append(json.dumps({"type": "appliance.final", "final": final}).encode())
    return headers, out


CREATES = [b'{"type":"response.create","model":"m","input":"a"}', b'{"type":"response.create","model":"m","input":"b"}']


def _verify(headers, sent, received) -> s.WebSocketVerifier:
    v = s.WebSocketVerifier(KEY.public_key(), UPGRADE, headers)
    for frame in sent:
        v.sent(frame)
    for frame in received:
        v.received(frame)
    return v


def test_a_session_verifies():
    headers, frames = _session(CREATES)
    v = _verify(headers, CREATES, frames)
    assert len(v.finals) == 2 and v.events == 6 and v.key_id == KID
    assert [f["client_seq"] for f in v.finals] == [1, 2]
    assert v.finals[0]["conversation"] == {"prev": "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
                                           "head": "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI="}


@pytest.mark.parametrize("what", ["altered event", "dropped event", "swapped events", "other create", "forged final"])
def test_tampering_is_refused(what):
    headers, frames = _session(CREATES)
    sent = list(CREATES)
    if what == "altered event":
        frames[0] = frames[0].replace(b"w00", b"w0X")
    elif what == "dropped event":
        del frames[2]
    elif what == "swapped events":
        frames[2], frames[3] = frames[3], frames[2]
    elif what == "other create":
        sent[0] = sent[0].replace(b'"a"', b'"z"')
    elif what == "forged final":
        fin = json.loads(frames[-1])
        fin["final"]["finish_reason"] = "length"
        frames[-1] = json.dumps(fin).encode()
    with pytest.raises(s.VerificationError):
        _verify(headers, sent, frames)


def test_the_101_must_be_signed_as_a_websocket_upgrade():
    headers, _ = _session(CREATES)
    with pytest.raises(s.VerificationError):
        s.WebSocketVerifier(KEY.public_key(), UPGRADE, {**headers, "x-request-id": "r2"})
    with pytest.raises(s.VerificationError):
        s.WebSocketVerifier(Ed25519PrivateKey.generate().public_key(), UPGRADE, headers)


def test_a_final_that_counts_frames_never_sent_is_refused():
    headers, frames = _session(CREATES)
    with pytest.raises(s.VerificationError, match="never sent"):
        _verify(headers, CREATES[:1], frames)
