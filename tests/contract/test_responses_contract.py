"""spec/openapi.yaml against the Responses and Conversations APIs, in-process on the fake engine.

Every request goes through `api` (conftest.SpecClient): each response's status, headers and body (and
each stream event) is validated against the spec and its signature verified as it arrives. Here: a
validated 200 for every operation of the two APIs (ids made by earlier calls), the request schemas
against the parsers, a table of bodies the spec and the server must agree on, and the streamed events.
"""

from __future__ import annotations

import json

import pytest

from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.schemas import (
    ConversationCreateRequest,
    ConversationItemsRequest,
    ConversationUpdateRequest,
    FunctionCallInput,
    FunctionCallOutputInput,
    InputMessage,
    ResponseNamedToolChoice,
    ResponseRequest,
    ResponseTool,
)
from tests.conftest import FIXED_NOW

BODY = {"model": "tiny", "input": "Hi"}


def _properties(spec, schema: dict) -> dict:
    schema = spec.resolve(schema)
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        props.update(_properties(spec, sub))
    return props


@pytest.mark.parametrize(
    "name, model",
    [("ResponseRequest", ResponseRequest), ("InputMessage", InputMessage),
     ("FunctionCallInput", FunctionCallInput), ("FunctionCallOutputInput", FunctionCallOutputInput),
     ("ResponseTool", ResponseTool), ("ResponseNamedToolChoice", ResponseNamedToolChoice),
     ("ConversationCreateRequest", ConversationCreateRequest), ("ConversationUpdateRequest", ConversationUpdateRequest),
     ("ConversationItemsRequest", ConversationItemsRequest)],
)
def test_request_schema_fields_match_the_parser(spec, name, model):
    schema = spec.resolve({"$ref": f"#/components/schemas/{name}"})
    props = _properties(spec, schema)
    fields = {f.alias or n for n, f in model.model_fields.items()}
    assert set(props) == fields, f"{name}: spec and parser differ in {sorted(set(props) ^ fields)}"
    required = {f.alias or n for n, f in model.model_fields.items() if f.is_required()}
    assert set(schema.get("required", [])) == required


WEBSOCKET = ("/v1/responses", "GET")
"""The WebSocket mode: a 101, never a 200 (tests/integration/test_responses_websocket.py)."""


def _paths(spec) -> set[tuple[str, str]]:
    return {(p, m) for p, m in spec.operations() if p.startswith(("/v1/responses", "/v1/conversations"))} - {WEBSOCKET}


def test_get_responses_without_an_upgrade_is_426(api, spec):
    assert WEBSOCKET in spec.operations()
    r = api.get("/v1/responses")
    assert r.status == 426 and r.json["error"]["code"] == "upgrade_required", r.json
    assert "Upgrade: websocket" in r.json["error"]["message"]
    # an upgrade the in-process server cannot take (no socket): still 426, saying why
    r = api.request("GET", "/v1/responses", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                     "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status == 426 and r.json["error"]["code"] == "upgrade_required", r.json
    for missing in ("Connection", "Sec-WebSocket-Version", "Sec-WebSocket-Key"):
        headers = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                   "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
        del headers[missing]
        r = api.request("GET", "/v1/responses", headers=headers)
        assert r.status == 426 and missing in r.json["error"]["message"], (missing, r.json)


def test_every_operation_of_the_two_apis_has_a_validated_200(api, spec):
    r = api.post("/v1/conversations", {"items": [{"role": "user", "content": "Hello"}], "metadata": {"topic": "t"}})
    assert r.status == 200, r.json
    cid = r.json["id"]
    r = api.post(f"/v1/conversations/{cid}/items", {"items": [{"type": "message", "role": "assistant",
                                                               "content": [{"type": "output_text", "text": "Hi!"}]}]})
    assert r.status == 200 and r.json["object"] == "list" and len(r.json["data"]) == 1
    item = r.json["data"][0]["id"]
    assert api.get(f"/v1/conversations/{cid}").status == 200
    assert api.post(f"/v1/conversations/{cid}", {"metadata": {"topic": "u"}}).json["metadata"] == {"topic": "u"}
    assert api.get(f"/v1/conversations/{cid}/items", query_string="order=asc&limit=5").status == 200
    assert api.get(f"/v1/conversations/{cid}/items/{item}").json["role"] == "assistant"
    r = api.post("/v1/responses", {**BODY, "conversation": cid})
    assert r.status == 200 and r.json["conversation"] == {"id": cid}
    rid = r.json["id"]
    stored = api.get(f"/v1/responses/{rid}").json
    chain = stored["x_appliance"].pop("chain")  # GET adds the turn's place in its chain (spec/signing.md §7)
    assert stored == r.json and set(chain) == {"prev", "head"}
    assert api.get(f"/v1/responses/{rid}/input_items").status == 200
    assert api.request("DELETE", f"/v1/conversations/{cid}/items/{item}").json["id"] == cid
    assert api.request("DELETE", f"/v1/responses/{rid}").json == {"id": rid, "object": "response", "deleted": True}
    assert api.request("DELETE", f"/v1/conversations/{cid}").json["deleted"] is True
    ok = {(p, m) for m, p, s in api.seen if s == 200}
    assert ok == _paths(spec), f"not covered: {sorted(_paths(spec) - ok)}"


def test_a_response_continues_a_previous_one(api, registry):
    first = api.post("/v1/responses", {**BODY, "instructions": "Be brief"}).json
    second = api.post("/v1/responses", {"model": "tiny", "input": "And?", "previous_response_id": first["id"]}).json
    assert second["previous_response_id"] == first["id"] and second["instructions"] is None
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"]
    items = api.get(f"/v1/responses/{second['id']}/input_items", query_string="order=asc").json["data"]
    assert [(i["role"], i["content"][0]["text"]) for i in items] == [
        ("user", "Hi"), ("assistant", "Hello, wörld!"), ("user", "And?")]
    assert items[1]["id"] == first["output"][0]["id"]
    # the prompt the engine got is the chat template over the first turn and the new input
    _, expected = registry.chat_prompt("tiny", [{"role": "user", "content": "Hi"},
                                                {"role": "assistant", "content": "Hello, wörld!"},
                                                {"role": "user", "content": "And?"}])
    assert list(registry.engine("tiny").submitted[-1].prompt) == expected


def test_the_stream_sends_the_typed_events_in_order(api):
    r = api.post("/v1/responses", {**BODY, "stream": True})
    assert r.status == 200 and r.events[-1] == "[DONE]"
    events = r.events[:-1]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * deltas,
                     "response.output_text.done", "response.content_part.done", "response.output_item.done",
                     "response.completed"]
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Hello, wörld!" == events[-4]["text"]
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == text and final["status"] == "completed"
    stored = api.get(f"/v1/responses/{final['id']}").json
    assert set(stored["x_appliance"].pop("chain")) == {"prev", "head"} and stored == final


def test_a_length_finish_is_incomplete(api):
    r = api.post("/v1/responses", {**BODY, "max_output_tokens": 2})
    assert r.json["status"] == "incomplete" and r.json["incomplete_details"] == {"reason": "max_output_tokens"}
    r = api.post("/v1/responses", {**BODY, "max_output_tokens": 2, "stream": True})
    assert r.events[-2]["type"] == "response.incomplete"


def test_unknown_ids_are_404_in_the_openai_shape(api):
    bogus = "resp_" + "0" * 48
    r = api.post("/v1/responses", {**BODY, "previous_response_id": bogus})
    assert r.status == 404 and r.json["error"]["code"] == "previous_response_not_found"
    assert r.json["error"]["param"] == "previous_response_id"
    r = api.post("/v1/responses", {**BODY, "conversation": {"id": "conv_nope"}})
    assert r.status == 404 and r.json["error"]["param"] == "conversation"
    for path in (f"/v1/responses/{bogus}", "/v1/responses/../../etc/passwd", "/v1/responses/x/input_items",
                 "/v1/conversations/conv_x", "/v1/conversations/conv_x/items", "/v1/conversations/conv_x/items/msg_y"):
        r = api.get(path)
        assert r.status == 404 and r.json["error"]["code"] == "not_found", path
    assert api.request("DELETE", f"/v1/responses/{bogus}").status == 404


def test_store_false_is_not_stored(api):
    r = api.post("/v1/responses", {**BODY, "store": False})
    assert r.status == 200 and r.json["store"] is False
    assert api.get(f"/v1/responses/{r.json['id']}").status == 404
    r = api.post("/v1/responses", {**BODY, "previous_response_id": r.json["id"]})
    assert r.status == 404 and r.json["error"]["code"] == "previous_response_not_found"


def test_list_queries_are_checked(api):
    cid = api.post("/v1/conversations", {"items": [{"role": "user", "content": str(i)} for i in range(5)]}).json["id"]
    page = api.get(f"/v1/conversations/{cid}/items", query_string="limit=2").json
    assert [i["content"][0]["text"] for i in page["data"]] == ["4", "3"] and page["has_more"] is True
    page = api.get(f"/v1/conversations/{cid}/items", query_string=f"limit=2&after={page['last_id']}").json
    assert [i["content"][0]["text"] for i in page["data"]] == ["2", "1"]
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("limit=x", "limit"), ("limit=", "limit"),
                         ("order=up", "order"), ("order=", "order")):
        r = api.get(f"/v1/conversations/{cid}/items", query_string=query)
        assert r.status == 400 and r.json["error"]["param"] == param, query
    for after in ("msg_nope", ""):  # a cursor that names no item of this list (the fuzz sent the empty one)
        r = api.get(f"/v1/conversations/{cid}/items", query_string=f"after={after}")
        assert r.status == 404 and r.json["error"]["param"] == "after", after


def test_a_conversation_over_its_item_limit_is_400(registry, make_api):
    settings = Settings.model_validate({"conversations": {"max_items_per_conversation": 3}})
    app, _ = create_app(settings, models=registry, wall_clock=lambda: FIXED_NOW)
    api = make_api(app)
    cid = api.post("/v1/conversations", {"items": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}).json["id"]
    r = api.post("/v1/responses", {**BODY, "conversation": cid})
    assert r.status == 400 and r.json["error"]["param"] == "conversation"
    r = api.post(f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "c"}] * 2})
    assert r.status == 400 and r.json["error"]["param"] == "items"
    r = api.post("/v1/conversations", {"items": [{"role": "user", "content": "c"}] * 4})
    assert r.status == 400 and r.json["error"]["param"] == "items"
    assert api.post(f"/v1/conversations/{cid}/items", {"items": [{"role": "user", "content": "c"}]}).status == 200


def test_post_to_a_read_only_route_is_405_whatever_the_body(app):
    import falcon.testing

    client = falcon.testing.TestClient(app)
    for path in ("/v1/responses/resp_x", "/v1/responses/resp_x/input_items", "/v1/conversations/conv_x/items/msg_y"):
        r = client.simulate_post(path, body=b"x", headers={"Content-Type": "text/plain"})
        assert r.status_code == 405, path


# A table of bodies: the spec's request schema accepts exactly those the server does not answer 400.
RESPONSE_CASES = [
    ({}, True),
    ({"input": None}, False),  # nothing to respond to (the spec: input, previous_response_id or conversation)
    ({"input": []}, False),
    ({"input": ""}, True),
    ({"input": 5}, False),
    ({"input": [{"role": "user", "content": "x"}]}, True),
    ({"input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "y", "annotations": []}]},
                {"role": "user", "content": [{"type": "input_text", "text": "z"}]}]}, True),
    ({"input": [{"role": "tool", "content": "x"}]}, False),
    ({"input": [{"role": "user"}]}, False),
    # a function_call_output without its call is schema-valid and a 400 (tests/contract/test_responses_tools_contract.py)
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "x"}]}, True),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}", "id": "fc_1", "status": "completed"},
                {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_text", "text": "x"}]}]}, True),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, False),
    ({"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]}, False),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, False),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "image_url": "x"}]}]},
     False),
    ({"input": [{"type": "item_reference", "id": "msg_x"}]}, False),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, False),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, False),
    ({"instructions": "Be brief"}, True),
    ({"instructions": 3}, False),
    ({"model": ""}, False),
    ({"store": False}, True),
    ({"store": "no"}, False),
    ({"stream": True}, True),
    ({"stream": None}, True),
    ({"stream_options": {"include_obfuscation": False}}, False),
    ({"stream": True, "stream_options": {"include_obfuscation": False}}, True),
    ({"max_output_tokens": 3}, True),
    ({"max_output_tokens": 0}, False),
    ({"max_output_tokens": True}, False),
    ({"metadata": {"k": "v"}}, True),
    ({"metadata": {"k": 1}}, False),
    ({"metadata": {"k" * 65: "v"}}, False),
    ({"metadata": {"k": "v" * 513}}, False),
    ({"metadata": {str(i): "v" for i in range(17)}}, False),
    ({"truncation": "disabled"}, True),
    ({"truncation": "middle"}, False),
    ({"text": {"format": {"type": "text"}}}, True),
    ({"text": {"format": {"type": "json_object"}}}, True),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "boolean"}, "strict": True}}}, True),
    ({"text": {"format": {"type": "text", "schema": {}}}}, False),
    ({"text": {"format": {"type": "xml"}}}, False),
    ({"text": {"verbosity": "high"}}, False),
    ({"temperature": 0}, True),
    ({"temperature": 3}, False),
    ({"top_p": 1.5}, False),
    ({"seed": 7, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1, "n_threads": 2, "n_ctx": 200}, True),
    ({"seed": -2}, False),
    ({"logit_bias": {"5": 1}}, True),
    ({"logit_bias": {"five": 1}}, False),
    ({"stop": "\n"}, True),
    ({"stop": ""}, False),
    ({"user": "u", "safety_identifier": "s", "prompt_cache_key": "k", "service_tier": "auto", "parallel_tool_calls": False,
      "max_tool_calls": 2}, True),
    ({"service_tier": "flex"}, False),
    # (bodies with tools: tests/contract/test_responses_tools_contract.py, on a model with room for the instruction)
    ({"tools": []}, True),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": "none"}, True),
    ({"tools": [{"type": "web_search"}]}, False),
    ({"tool_choice": {"type": "function", "name": "f"}}, False),
    ({"tool_choice": "auto"}, True),
    ({"tool_choice": "required"}, False),
    ({"include": []}, True),
    ({"include": ["message.output_text.logprobs"]}, False),
    ({"reasoning": None}, True),
    ({"reasoning": {"effort": "low"}}, False),
    ({"reasoning": False}, False),
    ({"prompt": []}, False),
    ({"tools": False}, False),
    ({"tool_choice": ["auto"]}, False),
    ({"background": 0}, False),
    ({"top_logprobs": 0.5}, False),
    ({"prompt": {"id": "pmpt_1"}}, False),
    ({"background": False}, True),
    ({"background": True}, False),
    ({"top_logprobs": 0}, True),
    ({"top_logprobs": 2}, False),
    ({"conversation": None}, True),
    ({"conversation": 5}, False),
    ({"conversation": {"name": "x"}}, False),
    ({"previous_response_id": ""}, False),
]


@pytest.mark.parametrize("extra, valid", RESPONSE_CASES, ids=[json.dumps(c[0])[:60] for c in RESPONSE_CASES])
def test_response_request_schema_agrees_with_the_server(api, spec, extra, valid):
    body = {**BODY, **extra}
    validator = spec.request_validator("/v1/responses", "POST")
    assert validator.is_valid(body) == valid, f"spec {'rejects' if valid else 'accepts'} {body}"
    r = api.post("/v1/responses", body)
    if valid:
        assert r.status == 200, f"{body}: the spec accepts it but the server answered {r.status}: {r.json}"
    else:
        assert r.status == 400, f"{body}: the spec rejects it but the server answered {r.status}: {r.json}"
        assert r.json["error"]["param"] is not None, r.json


def test_previous_response_and_conversation_are_exclusive(api, spec):
    body = {**BODY, "previous_response_id": "resp_" + "0" * 48, "conversation": "conv_" + "0" * 48}
    assert not spec.request_validator("/v1/responses", "POST").is_valid(body)
    r = api.post("/v1/responses", body)
    assert r.status == 400 and r.json["error"]["param"] == "conversation"


CONVERSATION_CASES = [
    ({}, True),
    ({"items": None, "metadata": None}, True),
    ({"items": [{"role": "system", "content": "x"}]}, True),
    ({"items": [{"role": "user", "content": "x"}] * 21}, False),
    ({"items": [{"role": "user", "content": 5}]}, False),
    ({"items": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": "ok"}]}, True),
    ({"items": [{"type": "item_reference", "id": "msg_x"}]}, False),
    ({"metadata": {"a": "b"}}, True),
    ({"metadata": []}, False),
]


@pytest.mark.parametrize("body, valid", CONVERSATION_CASES, ids=[json.dumps(c[0])[:60] for c in CONVERSATION_CASES])
def test_conversation_request_schema_agrees_with_the_server(api, spec, body, valid):
    assert spec.request_validator("/v1/conversations", "POST").is_valid(body) == valid
    r = api.post("/v1/conversations", body)
    assert r.status == (200 if valid else 400), r.json
