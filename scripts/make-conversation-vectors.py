"""Write spec/vectors/conversation/chain.json: a three-turn conversation chain (spec/signing.md §7).

Deterministic: fixed ids and bytes, so running it twice writes the same file. Run from the repository
root: `.venv/bin/python scripts/make-conversation-vectors.py`.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from attestation.signing import conversation_genesis, conversation_header, conversation_turn

OUT = Path(__file__).resolve().parents[1] / "spec" / "vectors" / "conversation" / "chain.json"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def main() -> None:
    chain_id = "conv_0123456789abcdef0123456789abcdef"
    requests = [
        b'{"model": "m", "input": "My name is Ada.", "conversation": "conv_0123456789abcdef0123456789abcdef"}',
        b'{"model": "m", "input": "What is my name?", "conversation": "conv_0123456789abcdef0123456789abcdef", "stream": true}',
        '{"model":"m","input":"Merci, \u00e0 bient\u00f4t.","conversation":"conv_0123456789abcdef0123456789abcdef"}'.encode(),
    ]
    responses = [
        b'{"id":"resp_01","object":"response","status":"completed","output":[{"type":"message","role":"assistant",'
        b'"content":[{"type":"output_text","text":"Hello Ada."}]}]}',
        b'{"type":"response.completed","sequence_number":8,"response":{"id":"resp_02","object":"response",'
        b'"status":"completed","output":[{"type":"message","role":"assistant","content":[{"type":"output_text",'
        b'"text":"Ada."}]}]}}',
        '{"id":"resp_03","object":"response","status":"incomplete","output":[{"type":"message","role":"assistant","content":[{"type":"output_text","text":"Au revoir \u2014"}]}]}'.encode(),
    ]
    head = conversation_genesis(chain_id)
    turns = []
    for i, (req, resp) in enumerate(zip(requests, responses)):
        new = conversation_turn(head, req, resp)
        turns.append({
            "request_body_b64": b64(req),
            "response_bytes_b64": b64(resp),
            "stream": i == 1,
            "prev_b64": b64(head),
            "head_b64": b64(new),
            "header": conversation_header(head, new),
        })
        head = new
    doc = {
        "description": "A conversation of three turns (spec/signing.md §7): head_0 from the chain id, then each turn's "
                       "(prev, head). Turn 2 was a stream: its response bytes are the final event's data. A verifier "
                       "must accept the turns in order and refuse any of them dropped, swapped or altered.",
        "chain_id": chain_id,
        "genesis_b64": b64(conversation_genesis(chain_id)),
        "turns": turns,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
