"""The Responses and Conversations APIs against the real server and llama.cpp, driven by the official
`openai` SDK: create, continue (previous_response_id), retrieve, delete, stream (raw events and the
SDK's `responses.stream` helper), conversations and their items, two API keys that cannot see each
other's records, bad ids and bad bodies; then the sealed directory across a worker restart (records
still there) and a full restart (gone)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import openai
import pytest
import requests
from openai.types.conversations import Conversation, ConversationItemList
from openai.types.responses import Response, ResponseItemList

from attestation import signing

pytestmark = pytest.mark.integration

KEY_A = "sk-test-alice-0123456789abcdef"
KEY_B = "sk-test-bob-fedcba9876543210"


def _config(directory: Path) -> str:
    return f"""
[[auth.api_keys]]
name = "alice"
sha256 = "{hashlib.sha256(KEY_A.encode()).hexdigest()}"

[[auth.api_keys]]
name = "bob"
sha256 = "{hashlib.sha256(KEY_B.encode()).hexdigest()}"

[model_defaults]
n_ctx = 512

[conversations]
directory = "{directory}"
"""


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversations") / "sealed"


@pytest.fixture(scope="module")
def rserver(start_server, model_files, state_dir):
    server = start_server(models={"m": model_files.main}, config=_config(state_dir), name="responses")
    yield server
    server.stop()


def _client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, timeout=120.0, max_retries=0)


@pytest.fixture(scope="module")
def alice(rserver):
    with _client(rserver, KEY_A) as c:
        yield c


@pytest.fixture(scope="module")
def bob(rserver):
    with _client(rserver, KEY_B) as c:
        yield c


def _strict(model, obj):
    """The JSON the server sent, validated (not just constructed) by the SDK's own pydantic model."""
    return model.model_validate(obj.model_dump(mode="json", exclude_unset=True))


def test_create_continue_retrieve_delete(alice):
    first = alice.responses.create(model="m", input="Say something.", max_output_tokens=12, temperature=0,
                                   instructions="You are terse.")
    _strict(Response, first)
    assert first.object == "response" and first.status in ("completed", "incomplete") and first.output_text
    assert first.usage.output_tokens > 0 and first.instructions == "You are terse."

    second = alice.responses.create(model="m", input="And then?", previous_response_id=first.id,
                                    max_output_tokens=12, temperature=0)
    _strict(Response, second)
    assert second.previous_response_id == first.id
    # the second prompt holds the first turn: more input tokens than the first prompt and its answer together
    assert second.usage.input_tokens > first.usage.input_tokens - 8 + first.usage.output_tokens
    items = list(alice.responses.input_items.list(second.id, order="asc"))
    texts = [(i.role, i.content[0].text) for i in items]
    assert texts == [("user", "Say something."), ("assistant", first.output_text), ("user", "And then?")]
    raw = alice.responses.input_items.with_raw_response.list(second.id, order="asc")
    assert [i.id for i in ResponseItemList.model_validate(raw.http_response.json()).data] == [i.id for i in items]
    page = alice.responses.input_items.list(second.id, limit=1)  # newest first, one per page
    assert [i.content[0].text for i in page.data] == ["And then?"] and page.has_more
    assert len(list(alice.responses.input_items.list(second.id, limit=1).iter_pages())) == 3

    again = alice.responses.retrieve(second.id).model_dump()
    chain = again["x_appliance"].pop("chain")  # GET adds the turn's place in its chain (spec/signing.md §7)
    assert again == second.model_dump() and set(chain) == {"prev", "head"}
    alice.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as e:
        alice.responses.retrieve(second.id)
    assert e.value.code == "not_found"
    with pytest.raises(openai.NotFoundError) as e:
        alice.responses.create(model="m", input="x", previous_response_id=second.id)
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    assert alice.responses.retrieve(first.id).id == first.id  # only that one went


def test_stream_events_in_order_with_sequence_numbers(alice):
    events = list(alice.responses.create(model="m", input="Count.", max_output_tokens=10, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    n = kinds.count("response.output_text.delta")
    assert n > 0
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * n, "response.output_text.done",
                     "response.content_part.done", "response.output_item.done",
                     "response.completed" if events[-1].response.status == "completed" else "response.incomplete"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text == events[-4].text
    assert alice.responses.retrieve(final.id).output_text == text

    # The SDK's helper wants `response.completed`: a grammar (a JSON boolean) makes the model finish.
    boolean = {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "boolean"}, "strict": True}}
    with alice.responses.stream(model="m", input="Yes or no?", text=boolean, max_output_tokens=40, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        done = stream.get_final_response()
    assert done.output_text == "".join(deltas) and done.output_text.strip() in ("true", "false")
    assert done.status == "completed"
    assert done.text.format.type == "json_schema"


def test_a_streamed_response_is_signed_to_its_last_event(rserver):
    pk = signing.public_key_from_b64(requests.get(rserver.url + "/v1/keys", timeout=10).json()["public_key"])
    body = b'{"model": "m", "input": "Hi", "max_output_tokens": 6, "stream": true}'
    r = requests.post(rserver.url + "/v1/responses", data=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == 200
    verified = signing.verify_stream(pk, request=signing.RequestInfo("POST", "/v1/responses", body),
                                     status=200, headers=dict(r.headers), transcript=r.content)
    assert verified.usage is not None and verified.usage["output_tokens"] > 0
    assert verified.finish_reason in ("stop", "length")


def test_conversations_crud_and_a_response_in_one(alice):
    conv = alice.conversations.create(items=[{"role": "user", "content": "My name is Ada."}], metadata={"topic": "intro"})
    _strict(Conversation, conv)
    assert conv.metadata == {"topic": "intro"}
    assert alice.conversations.retrieve(conv.id).id == conv.id
    assert alice.conversations.update(conv.id, metadata={"topic": "names"}).metadata == {"topic": "names"}
    added = alice.conversations.items.create(conv.id, items=[
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello Ada."}]}])
    _strict(ConversationItemList, added)
    r = alice.responses.create(model="m", input="What is my name?", conversation=conv.id, max_output_tokens=8,
                               temperature=0)
    assert r.conversation.id == conv.id
    items = list(alice.conversations.items.list(conv.id, order="asc", limit=2))  # auto-paging, two per page
    assert [i.role for i in items] == ["user", "assistant", "user", "assistant"]
    assert items[-1].id == r.output[0].id and items[-1].content[0].text == r.output_text
    assert alice.conversations.items.retrieve(items[1].id, conversation_id=conv.id).content[0].text == "Hello Ada."
    assert alice.conversations.items.delete(items[1].id, conversation_id=conv.id).id == conv.id
    assert len(list(alice.conversations.items.list(conv.id))) == 3
    assert alice.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.conversations.retrieve(conv.id)
    with pytest.raises(openai.NotFoundError) as e:
        alice.responses.create(model="m", input="x", conversation=conv.id)
    assert e.value.param == "conversation"


def test_another_key_gets_404(alice, bob):
    r = alice.responses.create(model="m", input="Private.", max_output_tokens=4)
    conv = alice.conversations.create(items=[{"role": "user", "content": "Private too."}])
    for call in (
        lambda: bob.responses.retrieve(r.id),
        lambda: bob.responses.delete(r.id),
        lambda: list(bob.responses.input_items.list(r.id)),
        lambda: bob.responses.create(model="m", input="x", previous_response_id=r.id),
        lambda: bob.conversations.retrieve(conv.id),
        lambda: bob.conversations.update(conv.id, metadata={"a": "b"}),
        lambda: list(bob.conversations.items.list(conv.id)),
        lambda: bob.conversations.items.create(conv.id, items=[{"role": "user", "content": "x"}]),
        lambda: bob.conversations.delete(conv.id),
        lambda: bob.responses.create(model="m", input="x", conversation=conv.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert alice.responses.retrieve(r.id).id == r.id
    assert len(list(alice.conversations.items.list(conv.id))) == 1


def test_bad_ids_are_404_and_bad_bodies_400(alice):
    for call in (
        lambda: alice.responses.retrieve("resp_nope"),
        lambda: alice.responses.retrieve("resp_" + "0" * 48),
        lambda: alice.conversations.retrieve("conv_" + "0" * 48),
        lambda: alice.conversations.items.retrieve("msg_x", conversation_id="conv_x"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    for kwargs, param in (
        ({"tools": [{"type": "web_search"}]}, "tools"),  # function tools: tests/integration/test_responses_tools.py
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"previous_response_id": "resp_x", "conversation": "conv_x"}, "conversation"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            alice.responses.create(model="m", **{"input": "x", **kwargs})
        assert e.value.param == param, (kwargs, e.value.body)


# ---------------------------------------------------------------------------------------------
# Restarts: the sealing key survives a worker's, not the process's


def _turn(rserver, pk, body: dict) -> tuple[dict, bytes, tuple[bytes, bytes], bytes]:
    """POST /v1/responses as raw bytes: (the response object, the request body, (prev, head) as signed,
    the response bytes the turn hashes), every signature verified on the way."""
    raw = json.dumps(body).encode()
    r = requests.post(rserver.url + "/v1/responses", data=raw, timeout=120,
                      headers={"Authorization": f"Bearer {KEY_A}", "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    info = signing.RequestInfo("POST", "/v1/responses", raw)
    if body.get("stream"):
        v = signing.verify_stream(pk, request=info, status=200, headers=dict(r.headers), transcript=r.content)
        assert v.conversation is not None, "a stream's final line carries its turn"
        final = [e for e in v.events if b'"type":"response.completed"' in e or b'"type":"response.incomplete"' in e]
        data = final[-1][len(b"data: "):-2]
        return json.loads(data)["response"], raw, v.conversation, data
    v = signing.verify_response(pk, request=info, status=200, headers=dict(r.headers), body=r.content)
    assert signing.CONVERSATION_HEADER in v.covered or f'"{signing.CONVERSATION_HEADER}"' in v.covered, v.covered
    return r.json(), raw, signing.parse_conversation_header(r.headers[signing.CONVERSATION_HEADER]), r.content


def test_a_conversation_is_a_signed_hash_chain_the_client_verifies(rserver, alice):
    """spec/signing.md §6: each turn's (prev, head) is signed; a client holding the transcript checks
    that every turn continues the last and recomputes it; a dropped, altered or reordered turn fails."""
    pk = signing.public_key_from_b64(requests.get(rserver.url + "/v1/keys", timeout=10).json()["public_key"])
    conv = alice.conversations.create(items=[])
    turns = [
        _turn(rserver, pk, {"model": "m", "input": f"Turn {i}.", "conversation": conv.id, "max_output_tokens": 4,
                            "stream": i == 1})
        for i in range(3)
    ]
    chain = signing.ConversationChain(conv.id)
    for _, raw, (prev, head), data in turns:
        chain.add(prev, head, raw, data)
    assert chain.turns == 3
    # a dropped turn, a reordered pair, an altered answer: each breaks the chain
    altered = turns[1][3].replace(b'"model":"m"', b'"model":"n"')
    assert altered != turns[1][3]
    for bad in ([turns[0], turns[2]], [turns[1], turns[0]], [turns[0], (None, turns[1][1], turns[1][2], altered)]):
        c = signing.ConversationChain(conv.id)
        with pytest.raises(signing.VerificationError):
            for _, raw, (prev, head), data in bad:
                c.add(prev, head, raw, data)
    # previous_response_id chains the same way, from the genesis of the first response's id
    first = _turn(rserver, pk, {"model": "m", "input": "One.", "max_output_tokens": 4})
    second = _turn(rserver, pk, {"model": "m", "input": "Two.", "max_output_tokens": 4,
                                 "previous_response_id": first[0]["id"], "stream": True})
    c = signing.ConversationChain(first[0]["id"])
    for _, raw, (prev, head), data in (first, second):
        c.add(prev, head, raw, data)
    # GET shows where each stored turn stands in its chain: the (prev, head) its answer signed
    for obj, _, (prev, head), _ in (first, second, turns[2]):
        got = alice.responses.retrieve(obj["id"]).model_extra["x_appliance"]["chain"]
        assert (base64.b64decode(got["prev"]), base64.b64decode(got["head"])) == (prev, head)


def _worker_pid(server) -> int:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    pid = server.proc.pid
    while kids.get(pid):
        pid = kids[pid][0]
    assert pid != server.proc.pid
    return pid


def test_records_survive_a_worker_restart_not_a_full_one(rserver, alice, state_dir, start_server, model_files):
    r = alice.responses.create(model="m", input="Remember this.", max_output_tokens=4)
    conv = alice.conversations.create(metadata={"kept": "yes"})
    [sealed] = list(state_dir.iterdir())  # the boot key's subdirectory
    assert (sealed / f"{r.id}.sealed").is_file()
    assert all(b"Remember this." not in p.read_bytes() for p in sealed.iterdir())

    old = _worker_pid(rserver)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        try:
            ready = requests.get(rserver.url + "/readiness", timeout=5).status_code == 200
        except requests.RequestException:
            ready = False
        if ready and _worker_pid(rserver) != old:
            break
        assert time.monotonic() < deadline, rserver.logs()[-3000:]
        time.sleep(0.1)
    assert alice.responses.retrieve(r.id).output_text == r.output_text
    assert alice.conversations.retrieve(conv.id).metadata == {"kept": "yes"}

    rserver.stop()  # a full restart: a new identity, so a new sealing key
    again = start_server(models={"m": model_files.main}, config=_config(state_dir), name="responses-restarted")
    try:
        with _client(again, KEY_A) as c:
            with pytest.raises(openai.NotFoundError):
                c.responses.retrieve(r.id)
        assert len(list(state_dir.iterdir())) == 2  # a new key writes a new subdirectory; the old one stays
    finally:
        again.stop()

