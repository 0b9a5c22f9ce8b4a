"""spec/vectors/conversation/chain.json against spec/signing.md §7: the heads recomputed here from the
formula as the spec writes it (hashlib only), and the reference verifier (ConversationChain) accepting
the chain in order and refusing it with a turn dropped, swapped, altered or from another chain."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest

from attestation.signing import ConversationChain, VerificationError, parse_conversation_header

VECTOR = Path(__file__).resolve().parents[2] / "spec" / "vectors" / "conversation" / "chain.json"
DOC = json.loads(VECTOR.read_text())


def _turns() -> list[tuple[bytes, bytes, bytes, bytes]]:
    d = base64.b64decode
    return [(d(t["prev_b64"]), d(t["head_b64"]), d(t["request_body_b64"]), d(t["response_bytes_b64"]))
            for t in DOC["turns"]]


def test_the_heads_follow_the_formula_as_written():
    head = hashlib.sha256(b"appliance-conversation-v1\x00genesis\x00" + DOC["chain_id"].encode()).digest()
    assert base64.b64encode(head).decode() == DOC["genesis_b64"]
    for t, (prev, new, req, resp) in zip(DOC["turns"], _turns()):
        assert prev == head
        head = hashlib.sha256(b"appliance-conversation-v1\x00turn\x00" + prev + hashlib.sha256(req).digest()
                              + hashlib.sha256(resp).digest()).digest()
        assert head == new
        assert parse_conversation_header(t["header"]) == (prev, new)
        assert t["header"] == f"prev=:{t['prev_b64']}:, head=:{t['head_b64']}:"


def test_the_reference_verifier_accepts_the_chain():
    chain = ConversationChain(DOC["chain_id"])
    for turn in _turns():
        chain.add(*turn)
    assert chain.turns == 3 and chain.head == _turns()[-1][1]


def _altered(turn):
    prev, head, req, resp = turn
    return prev, head, req, resp[:-1] + b" "


@pytest.mark.parametrize("name,order", [
    ("dropped", lambda t: [t[0], t[2]]),
    ("swapped", lambda t: [t[1], t[0], t[2]]),
    ("replayed", lambda t: [t[0], t[0]]),
    ("altered answer", lambda t: [t[0], _altered(t[1])]),
    ("altered request", lambda t: [t[0], (t[1][0], t[1][1], t[1][2] + b" ", t[1][3])]),
    ("first turn missing", lambda t: [t[1], t[2]]),
])
def test_a_broken_chain_is_refused(name, order):
    chain = ConversationChain(DOC["chain_id"])
    with pytest.raises(VerificationError):
        for turn in order(_turns()):
            chain.add(*turn)


def test_another_chain_id_is_refused():
    with pytest.raises(VerificationError):
        ConversationChain("conv_another").add(*_turns()[0])


@pytest.mark.parametrize("value", ["prev=:AAAA:, head=:AAAA:", "head=:" + "A" * 44 + ":", "garbage", "prev=1, head=2"])
def test_malformed_headers_are_refused(value):
    with pytest.raises(VerificationError):
        parse_conversation_header(value)
