"""The Responses and Conversations APIs in-process: whose records are whose (two API keys), the context
policy (pruning the oldest turns), the conversation a response appends to, what a stream stores, and
the sealed directory across a worker restart (same identity) and a full restart (a new one)."""

from __future__ import annotations

import hashlib
import json
import logging

import falcon.testing
import pytest

from appliance.settings import Settings
from appliance.trust.identity import Identity
from appliance.web.app import create_app
from attestation import signing
from tests.conftest import FIXED_NOW, FakeRegistry

KEYS = {"alice": "sk-alice-0123456789", "bob": "sk-bob-9876543210"}


class Api:
    """A signed-response-verifying client; `as_` picks the API key (None: no credentials)."""

    def __init__(self, app: falcon.App, key: str | None = None) -> None:
        self.client = falcon.testing.TestClient(app)
        self.public = signing.public_key_from_b64(self.client.simulate_get("/v1/keys").json["public_key"])
        self.key = key

    def as_(self, who: str | None) -> Api:
        other = Api.__new__(Api)
        other.client, other.public, other.key = self.client, self.public, KEYS[who] if who else None
        return other

    def request(self, method: str, path: str, body: object = None, query: str = "") -> falcon.testing.Result:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        raw = b""
        if body is not None:
            raw = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        r = self.client.simulate_request(method, path, body=raw or None, headers=headers, query_string=query or None)
        info = signing.RequestInfo(method, path + (f"?{query}" if query else ""), raw)
        if "event-stream" in r.headers.get("content-type", ""):
            signing.verify_stream(self.public, request=info, status=r.status_code, headers=dict(r.headers), transcript=r.content)
        else:
            signing.verify_response(self.public, request=info, status=r.status_code, headers=dict(r.headers), body=r.content)
        return r

    def post(self, path: str, body: object) -> falcon.testing.Result:
        return self.request("POST", path, body)

    def get(self, path: str, query: str = "") -> falcon.testing.Result:
        return self.request("GET", path, query=query)

    def delete(self, path: str) -> falcon.testing.Result:
        return self.request("DELETE", path)


def settings(**conversations) -> Settings:
    keys = [{"name": name, "sha256": hashlib.sha256(k.encode()).hexdigest()} for name, k in KEYS.items()]
    return Settings.model_validate({"auth": {"api_keys": keys}, "conversations": conversations})


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("tiny")
    return reg


@pytest.fixture
def api(registry) -> Api:
    app, _ = create_app(settings(), models=registry, wall_clock=lambda: FIXED_NOW)
    return Api(app)


def not_found(r: falcon.testing.Result, code: str = "not_found") -> None:
    assert r.status_code == 404, r.text
    assert r.json["error"]["code"] == code and r.json["error"]["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------
# Ownership


def test_another_key_gets_404_for_everything_the_first_key_stored(api):
    alice, bob = api.as_("alice"), api.as_("bob")
    resp = alice.post("/v1/responses", {"model": "tiny", "input": "Hi"}).json
    conv = alice.post("/v1/conversations", {"items": [{"role": "user", "content": "Hi"}]}).json
    item = alice.get(f"/v1/conversations/{conv['id']}/items").json["data"][0]["id"]
    rid, cid = resp["id"], conv["id"]
    not_found(bob.get(f"/v1/responses/{rid}"))
    not_found(bob.get(f"/v1/responses/{rid}/input_items"))
    not_found(bob.delete(f"/v1/responses/{rid}"))
    not_found(bob.post("/v1/responses", {"model": "tiny", "input": "x", "previous_response_id": rid}),
              "previous_response_not_found")
    not_found(bob.post("/v1/responses", {"model": "tiny", "input": "x", "conversation": cid}))
    not_found(bob.get(f"/v1/conversations/{cid}"))
    not_found(bob.post(f"/v1/conversations/{cid}", {"metadata": {"a": "b"}}))
    not_found(bob.get(f"/v1/conversations/{cid}/items"))
    not_found(bob.post(f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "x"}]}))
    not_found(bob.get(f"/v1/conversations/{cid}/items/{item}"))
    not_found(bob.delete(f"/v1/conversations/{cid}/items/{item}"))
    not_found(bob.delete(f"/v1/conversations/{cid}"))
    # Alice's records are untouched by Bob's tries
    stored = alice.get(f"/v1/responses/{rid}").json
    chain = stored["x_appliance"].pop("chain")  # GET adds the turn's place in its chain (spec/signing.md §7)
    assert stored == resp and set(chain) == {"prev", "head"}
    assert alice.get(f"/v1/conversations/{cid}").json == conv
    assert [i["id"] for i in alice.get(f"/v1/conversations/{cid}/items").json["data"]] == [item]
    assert api.as_(None).get(f"/v1/responses/{rid}").status_code == 401


def test_on_an_open_loopback_server_whoever_holds_the_id_may_use_it(registry):
    app, _ = create_app(Settings(), models=registry, wall_clock=lambda: FIXED_NOW)
    api = Api(app)
    rid = api.post("/v1/responses", {"model": "tiny", "input": "Hi"}).json["id"]
    assert api.get(f"/v1/responses/{rid}").status_code == 200
    assert api.as_("alice").get(f"/v1/responses/{rid}").status_code == 200  # a token is ignored when no keys exist


# ---------------------------------------------------------------------------------------------
# Conversations and streams


def test_a_response_in_a_conversation_sees_its_items_and_appends_the_exchange(api, registry):
    alice = api.as_("alice")
    cid = alice.post("/v1/conversations", {"items": [{"role": "system", "content": "Be brief"},
                                                      {"role": "user", "content": "Hi"}]}).json["id"]
    r = alice.post("/v1/responses", {"model": "tiny", "conversation": cid})  # no new input: respond to the items
    assert r.status_code == 200, r.text
    r = alice.post("/v1/responses", {"model": "tiny", "input": "More", "conversation": {"id": cid}, "store": False})
    assert r.status_code == 200 and r.json["conversation"] == {"id": cid}
    items = alice.get(f"/v1/conversations/{cid}/items", query="order=asc").json["data"]
    assert [(i["role"], i["content"][0]["text"]) for i in items] == [
        ("system", "Be brief"), ("user", "Hi"), ("assistant", "Hello, wörld!"), ("user", "More"),
        ("assistant", "Hello, wörld!")]
    assert items[-1]["id"] == r.json["output"][0]["id"]
    _, expected = registry.chat_prompt("tiny", [{"role": i["role"], "content": i["content"][0]["text"]} for i in items[:4]])
    assert list(registry.engine("tiny").submitted[-1].prompt) == expected
    not_found(alice.get(f"/v1/responses/{r.json['id']}"))  # store: false


def test_a_finished_stream_is_stored_and_one_cut_short_is_not(api, registry):
    alice = api.as_("alice")
    r = alice.post("/v1/responses", {"model": "tiny", "input": "Hi", "stream": True})
    final = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")][-1]
    assert final["type"] == "response.completed"
    stored = alice.get(f"/v1/responses/{final['response']['id']}").json
    assert set(stored["x_appliance"].pop("chain")) == {"prev", "head"} and stored == final["response"]

    # cut short: the client reads the first events, then goes away (the server closes the body)
    raw = json.dumps({"model": "tiny", "input": "Hi", "stream": True}).encode()
    env = falcon.testing.create_environ("/v1/responses", method="POST", body=raw, headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {KEYS['alice']}"})
    body = api.client.app(env, lambda status, headers, exc_info=None: None)
    it = iter(body)
    first = next(it)
    created = json.loads(first.split(b"\n")[0][6:])["response"]["id"]
    next(it)
    body.close()
    assert registry.engine("tiny").generations[-1].closed
    not_found(alice.get(f"/v1/responses/{created}"))


def test_a_failure_ends_the_stream_with_an_error_event_and_stores_nothing(api, registry):
    from appliance.engine.errors import EngineCrashed
    from appliance.engine.events import Failed

    registry.engine("tiny").fail_with = Failed(EngineCrashed("boom"))
    alice = api.as_("alice")
    r = alice.post("/v1/responses", {"model": "tiny", "input": "Hi", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.split("\n") if line.startswith("data: {")]
    assert "error" in events[-1] and events[-1]["error"]["code"] == "engine_error"
    created = events[0]["response"]["id"]
    not_found(alice.get(f"/v1/responses/{created}"))


# ---------------------------------------------------------------------------------------------
# The context policy


def test_the_oldest_turns_are_pruned_to_fit_and_the_instructions_kept(registry):
    registry.add("small", n_ctx=400)
    app, _ = create_app(settings(), models=registry, wall_clock=lambda: FIXED_NOW)
    alice = Api(app).as_("alice")
    prev = None
    pruned = []
    for i in range(8):
        body = {"model": "small", "input": f"turn {i} " + "x" * 30, "instructions": "INSTRUCTIONS",
                "max_output_tokens": 8}
        if prev:
            body["previous_response_id"] = prev
        r = alice.post("/v1/responses", body)
        assert r.status_code == 200, r.text
        prev = r.json["id"]
        pruned.append(r.json["x_appliance"]["pruned_items"])
        prompt = registry.engine("small").submitted[-1].prompt
        assert len(prompt) == r.json["usage"]["input_tokens"] <= 400 - 8
    assert pruned[0] == 0 and any(pruned), pruned
    items = alice.get(f"/v1/responses/{prev}/input_items", query="order=asc&limit=100").json["data"]
    texts = [i["content"][0]["text"] for i in items]
    assert texts[-1].startswith("turn 7") and not any(t.startswith("turn 0") for t in texts)
    assert items[0]["role"] == "user"  # a turn is left out whole: the kept history starts at a user message
    # the instructions are in every prompt: the fake tokenizer maps a character to one token
    model = registry.engine("small").model
    marker = model.tokenize("INSTRUCTIONS", add_special=False)
    prompt = list(registry.engine("small").submitted[-1].prompt)
    assert any(prompt[i : i + len(marker)] == marker for i in range(len(prompt)))

    r = alice.post("/v1/responses", {"model": "small", "input": "again", "previous_response_id": prev,
                                     "truncation": "disabled", "max_output_tokens": 8})
    # the whole stored history still fits here; with a longer one, disabled is a context error
    assert r.status_code == 200 and r.json["x_appliance"]["pruned_items"] == 0
    long = alice.post("/v1/responses", {"model": "small", "input": "y" * 500, "truncation": "disabled"})
    assert long.status_code == 400 and long.json["error"]["code"] == "context_length_exceeded"
    assert long.json["error"]["param"] == "input"


def test_system_messages_of_the_history_are_never_pruned(registry):
    registry.add("small", n_ctx=300)
    app, _ = create_app(settings(), models=registry, wall_clock=lambda: FIXED_NOW)
    alice = Api(app).as_("alice")
    items = [{"role": "system", "content": "SYSTEM RULE"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " + "z" * 40} for i in range(8)]
    cid = alice.post("/v1/conversations", {"items": items}).json["id"]
    r = alice.post("/v1/responses", {"model": "small", "input": "last", "conversation": cid, "max_output_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json["x_appliance"]["pruned_items"] > 0
    seen = alice.get(f"/v1/responses/{r.json['id']}/input_items", query="order=asc&limit=100").json["data"]
    assert seen[0]["content"][0]["text"] == "SYSTEM RULE" and seen[-1]["content"][0]["text"] == "last"
    # the conversation itself keeps every item: pruning shapes a prompt, not the record
    stored = alice.get(f"/v1/conversations/{cid}/items", query="limit=100").json["data"]
    assert len(stored) == len(items) + 2


# ---------------------------------------------------------------------------------------------
# The sealed directory across restarts


def test_a_worker_restart_reads_the_directory_and_a_full_restart_cannot(registry, tmp_path):
    directory = tmp_path / "state"
    identity = Identity()  # made in the master before the fork: every worker gets the same one
    app, _ = create_app(settings(directory=str(directory)), models=registry, identity=identity,
                        wall_clock=lambda: FIXED_NOW)
    alice = Api(app).as_("alice")
    rid = alice.post("/v1/responses", {"model": "tiny", "input": "remember me"}).json["id"]
    cid = alice.post("/v1/conversations", {"metadata": {"k": "v"}}).json["id"]
    [sealed] = list(directory.iterdir())  # the boot key's subdirectory
    assert sorted(p.name for p in sealed.iterdir()) == sorted([f"{rid}.sealed", f"{cid}.sealed"])
    assert all(b"remember me" not in p.read_bytes() for p in sealed.iterdir())

    worker2, _ = create_app(settings(directory=str(directory)), models=registry, identity=identity,
                            wall_clock=lambda: FIXED_NOW)
    again = Api(worker2)
    assert again.as_("alice").get(f"/v1/responses/{rid}").json["id"] == rid
    assert again.as_("alice").get(f"/v1/conversations/{cid}").json["metadata"] == {"k": "v"}
    not_found(again.as_("bob").get(f"/v1/responses/{rid}"))

    restarted, _ = create_app(settings(directory=str(directory)), models=registry, identity=Identity(),
                              wall_clock=lambda: FIXED_NOW)
    not_found(Api(restarted).as_("alice").get(f"/v1/responses/{rid}"))
    assert len(list(directory.iterdir())) == 2 and len(list(sealed.iterdir())) == 2  # a new key, a new subdirectory


def test_prompts_and_completions_never_reach_the_logs(api, caplog):
    caplog.set_level(logging.DEBUG)
    alice = api.as_("alice")
    r = alice.post("/v1/responses", {"model": "tiny", "input": "PRIVATE-PROMPT", "stream": True})
    assert r.status_code == 200
    alice.post("/v1/conversations", {"items": [{"role": "user", "content": "PRIVATE-ITEM"}]})
    assert "PRIVATE" not in caplog.text and "wörld" not in caplog.text
