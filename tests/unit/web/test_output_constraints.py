"""logit_bias and structured output on the wire: parsing, the 400s that name the field, and what
reaches the engine (the fake registry runs the real grammar and schema checks, not llama.cpp)."""

from __future__ import annotations

import falcon.testing
import pytest

from appliance.engine.grammar import JSON_OBJECT_GBNF
from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.errors import BadRequest
from appliance.web.schemas import MAX_LOGIT_BIAS, ChatRequest, CompletionRequest, parse
from tests.conftest import FIXED_NOW, FakeGrammar, FakeRegistry

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


@pytest.mark.parametrize("extra, param, says", [
    ({"logit_bias": {"five": 1}}, "logit_bias", "'five' is not one"),
    ({"logit_bias": {"05": 1}}, "logit_bias", "is not one"),
    ({"logit_bias": {"-3": 1}}, "logit_bias", "is not one"),
    ({"logit_bias": {"5": 1000}}, "logit_bias", "less than or equal to 100"),
    ({"logit_bias": {"5": -101}}, "logit_bias", "greater than or equal to -100"),
    ({"logit_bias": {"5": True}}, "logit_bias", "valid number"),
    ({"logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}}, "logit_bias", f"at most {MAX_LOGIT_BIAS} tokens"),
    ({"logit_bias": [1, 2]}, "logit_bias", "valid dictionary"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs a json_schema object"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'text', 'json_object' or 'json_schema'"),
    ({"response_format": {"type": "text", "json_schema": {"schema": {}}}}, "response_format", "only allowed with type json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{}"}}}, "response_format", "valid dictionary"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "", "schema": {}}}}, "response_format", "at least 1 character"),
    ({"json_schema": ["not", "an", "object"]}, "json_schema", "valid dictionary"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "json_schema", "only one of"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "only one of"),
])
def test_bad_fields_are_400s_naming_them(extra, param, says):
    for model, base in ((ChatRequest, CHAT), (CompletionRequest, {"model": "tiny", "prompt": "x"})):
        with pytest.raises(BadRequest) as e:
            parse(model, {**base, **extra})
        assert e.value.param == param and says in e.value.message, e.value.message


@pytest.mark.parametrize("extra, param, gbnf, schema", [
    ({}, None, None, None),
    ({"response_format": {"type": "text"}, "grammar": ""}, None, None, None),
    ({"response_format": {"type": "json_object"}}, "response_format", JSON_OBJECT_GBNF, None),
    ({"response_format": {"type": "json_object", "schema": SCHEMA}}, "response_format", None, SCHEMA),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "response_format", None, SCHEMA),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", JSON_OBJECT_GBNF, None),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "text"}}, "grammar", 'root ::= "a"', None),
    ({"json_schema": SCHEMA}, "json_schema", None, SCHEMA),
])
def test_what_constrains_the_output(extra, param, gbnf, schema):
    c = parse(ChatRequest, {**CHAT, **extra}).output_constraint()
    if param is None:
        assert c is None
    else:
        assert c is not None and (c.param, c.gbnf, c.schema) == (param, gbnf, schema)


def test_logit_bias_pairs():
    body = parse(ChatRequest, {**CHAT, "logit_bias": {"7": -100, "0": 2.5}})
    assert body.biases == ((7, -100.0), (0, 2.5))
    assert parse(ChatRequest, CHAT).biases == ()


# ---------------------------------------------------------------------------------------------
# Through the app


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("tiny")
    return reg


@pytest.fixture
def client(registry) -> falcon.testing.TestClient:
    app, _ = create_app(Settings(), models=registry, wall_clock=lambda: FIXED_NOW)
    return falcon.testing.TestClient(app)


def post(client, path, body):
    return client.simulate_post(path, json=body)


def test_constraints_reach_the_engine(client, registry):
    r = post(client, "/v1/chat/completions", {**CHAT, "logit_bias": {"5": -100}, "temperature": 0,
                                              "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}})
    assert r.status_code == 200, r.text
    sampling = registry.engine("tiny").submitted[-1].sampling
    assert sampling.logit_bias == ((5, -100.0),) and sampling.temperature == 0
    assert isinstance(sampling.grammar, FakeGrammar) and "root ::=" in sampling.grammar.gbnf
    r = post(client, "/v1/completions", {"model": "tiny", "prompt": "x", "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert registry.engine("tiny").submitted[-1].sampling.grammar.gbnf == 'root ::= "yes" | "no"'


@pytest.mark.parametrize("path, extra, param, says", [
    ("/v1/chat/completions", {"logit_bias": {"64": 1}}, "logit_bias", "token id 64 is not in this model's vocabulary"),
    ("/v1/completions", {"logit_bias": {"1000000": 1}}, "logit_bias", "not in this model's vocabulary"),
    ("/v1/chat/completions", {"json_schema": {"type": "integer", "minimum": 3}}, "json_schema", "'minimum' is not supported"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}}}},
     "response_format", "'uniqueItems' is not supported (at properties/tags)"),
    ("/v1/completions", {"grammar": "root ::= ("}, "grammar", "invalid GBNF grammar"),
    ("/v1/completions", {"grammar": 'root ::= item'}, "grammar", "rule 'item' is used but not defined"),
])
def test_refusals_from_the_engine_name_the_field(client, path, extra, param, says):
    base = CHAT if "chat" in path else {"model": "tiny", "prompt": "x"}
    r = post(client, path, {**base, **extra})
    assert r.status_code == 400, r.text
    err = r.json["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and says in err["message"], err
