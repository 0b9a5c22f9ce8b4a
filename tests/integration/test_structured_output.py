"""Structured output and logit_bias through the real server: JSON schemas, json_object, GBNF grammars,
the official SDK's `chat.completions.parse`, refusals, and signed answers.

The shared server's model has random weights: whatever it would write, the grammar must hold it to the
schema, so a `"stop"` finish must parse and validate. Gemma 3 270M (real weights) then shows the SDK's
parse round trip on a model that writes sensible JSON.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Literal

import jsonschema
import pydantic
import pytest
import requests
from appliance_it import Server, assert_error, llama_server, sse_events

from appliance.engine.grammar import schema_gbnf
from attestation import signing

pytestmark = pytest.mark.integration

MODEL = "m"
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]
MAX_AGE = datetime.timedelta(minutes=5)

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "count": {"type": "integer"},
        "colour": {"enum": ["red", "green", "blue"]},
        "word": {"type": "string", "maxLength": 8},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    },
    "required": ["ok", "count", "colour", "word", "maybe"],
    "additionalProperties": False,
}


class Answer(pydantic.BaseModel):
    ok: bool
    colour: Literal["red", "green", "blue"]
    count: int
    word: str = pydantic.Field(max_length=6)


def chat(server: Server, **body) -> requests.Response:
    return server.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 400, **body})


def structured(body: dict) -> tuple[str, str]:
    """(the content, the finish_reason) of a chat or completion answer."""
    choice = body["choices"][0]
    return choice.get("message", {}).get("content") or choice.get("text", ""), choice["finish_reason"]


# ---------------------------------------------------------------------------------------------
# Random weights, constrained


@pytest.mark.parametrize("seed", [1, 2])
def test_json_schema_output_validates(server, seed):
    r = chat(server, seed=seed, response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    assert r.status_code == 200, r.text
    text, finish = structured(r.json())
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), SCHEMA)


def test_llama_server_fields_on_completions_and_streams(server):
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "JSON:", "max_tokens": 400, "seed": 3, "json_schema": SCHEMA})
    assert r.status_code == 200, r.text
    text, finish = structured(r.json())
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)

    r = server.post("/v1/completions", json={"model": MODEL, "prompt": "Yes or no?", "max_tokens": 8, "temperature": 0,
                                             "grammar": 'root ::= "yes" | "no"'})
    assert r.status_code == 200, r.text
    assert structured(r.json()) in (("yes", "stop"), ("no", "stop"))

    r = chat(server, seed=4, stream=True, response_format={"type": "json_object", "schema": SCHEMA}, stream_options={"include_usage": True})
    assert r.status_code == 200, r.text
    events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if isinstance(e, dict) and e["choices"])
    finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if isinstance(e, dict) and e["choices"]][-1]
    assert finish == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_is_one_json_object(server):
    r = chat(server, seed=5, max_tokens=600, response_format={"type": "json_object"})
    assert r.status_code == 200, r.text
    text, finish = structured(r.json())
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # random weights may write a long object: cut short, it still opens as one
        assert finish == "length" and text.lstrip().startswith("{")


def test_a_cut_short_output_says_length(server):
    r = chat(server, seed=6, max_tokens=3, response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}})
    assert r.status_code == 200, r.text
    text, finish = structured(r.json())
    assert finish == "length" and text.startswith("{")


def test_the_sdk_parse_returns_the_model_object(server):
    with server.openai() as client:
        done = client.chat.completions.parse(model=MODEL, messages=MESSAGES, response_format=Answer, max_tokens=400, seed=7)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Answer), message.content
    assert Answer.model_validate_json(message.content) == message.parsed


def first_token(server: Server, body: dict, path: str) -> tuple[str, int]:
    """The text of the first token a greedy request writes, and its id (tokenizing that token's own
    text gives back the one token)."""
    r = server.post(path, json={**body, "max_tokens": 1, "temperature": 0})
    assert r.status_code == 200, r.text
    text, _ = structured(r.json())
    tokens = server.post("/tokenize", json={"model": body["model"], "content": text}).json()["tokens"]
    assert len(tokens) == 1, (text, tokens)
    return text, tokens[0]


def test_logit_bias_bans_what_greedy_would_pick(server):
    body = {"model": MODEL, "prompt": "The quick brown fox"}
    text, token = first_token(server, body, "/v1/completions")
    r = server.post("/v1/completions", json={**body, "max_tokens": 1, "temperature": 0, "logit_bias": {str(token): -100}})
    assert r.status_code == 200, r.text
    assert structured(r.json())[0] != text
    r = server.post("/v1/completions", json={**body, "max_tokens": 1, "temperature": 0, "logit_bias": {str(token): -0.001}})
    assert structured(r.json())[0] == text  # a nudge is not a ban


GRAMMAR_MARK = "MARK-8c1f"  # text that must never reach the server's logs

BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": ["not", "an", "object"]}}}, "response_format", "dictionary"),
    ({"json_schema": "{}"}, "json_schema", "dictionary"),
    ({"json_schema": {"type": "integer", "minimum": 0}}, "json_schema", "'minimum' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"type": "string", "format": "email", "not": {"const": "x"}}}}}}}, "response_format", "'not' is not supported (at properties/a)"),
    ({"grammar": f'root ::= "{GRAMMAR_MARK}" ('}, "grammar", "expecting ')'"),
    ({"grammar": "root ::= " + "(" * 40_000 + '"a"' + ")" * 40_000}, "grammar", "nested deeper than 2000"),
    ({"grammar": f'root ::= root "{GRAMMAR_MARK}" | "a"'}, "grammar", "left recursion"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias", "not in this model's vocabulary"),
    ({"logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias", "at most 1024"),
    ({"logit_bias": {"5": 1000}}, "logit_bias", "less than or equal to 100"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "json_schema", "only one of"),
]


@pytest.mark.parametrize("extra, param, says", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_input_is_a_400_naming_the_field_and_the_server_serves_on(server, extra, param, says):
    for path, body in (("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "Hi"})):
        r = server.post(path, json={"model": MODEL, "max_tokens": 4, **body, **extra})
        err = assert_error(r, 400, "invalid_request_error", param=param)
        assert says in err["message"], err
        assert len(err["message"]) < 400
    r = chat(server, max_tokens=2)
    assert r.status_code == 200 and server.get("/health").status_code == 200
    assert GRAMMAR_MARK not in server.stdout() + server.stderr()


def test_constrained_answers_are_signed(server):
    pk = signing.public_key_from_b64(server.get("/v1/keys").json()["public_key"])
    for payload, stream in (
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}, "seed": 8}, False),
        ({"grammar": 'root ::= "yes" | "no"', "stream": True}, True),
        ({"json_schema": {"type": "integer", "minimum": 0}}, False),  # a refusal is signed too
    ):
        raw_body = json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 400, **payload}).encode()
        r = requests.post(server.url + "/v1/chat/completions", data=raw_body, stream=stream, timeout=120,
                          headers={"Content-Type": "application/json", "Connection": "close"})
        raw = b"".join(r.iter_content(chunk_size=None)) if stream else r.content
        info = signing.RequestInfo("POST", "/v1/chat/completions", raw_body)
        common = dict(request=info, status=r.status_code, headers=dict(r.headers), max_age=MAX_AGE)
        if stream:
            v = signing.verify_stream(pk, transcript=raw, **common)
            assert v.finish_reason == "stop"
        else:
            signing.verify_response(pk, body=raw, **common)


# ---------------------------------------------------------------------------------------------
# Real weights: Gemma 3 270M


GEMMA = "gemma3-270m"


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={GEMMA: real_model}, config="[model_defaults]\nn_ctx = 1024\nparallel = 2\n",
                          name="gemma-structured")
    yield server
    server.stop()


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=40)
    country: str = pydantic.Field(max_length=40)
    population_millions: float
    capital: bool


def test_the_sdk_parse_on_real_weights(gemma):
    with gemma.openai() as client:
        done = client.chat.completions.parse(
            model=GEMMA, max_tokens=200, temperature=0, response_format=City,
            messages=[{"role": "user", "content": "Give me the city of Paris as JSON with name, country, "
                                                  "population_millions and capital."}])
    city = done.choices[0].message.parsed
    assert done.choices[0].finish_reason == "stop" and isinstance(city, City), done.choices[0].message.content
    assert city.name  # real weights write something sensible; the schema holds whatever they write


def test_logit_bias_changes_greedy_on_real_weights(gemma):
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    text, token = first_token(gemma, body, "/v1/chat/completions")
    r = gemma.post("/v1/chat/completions", json={**body, "max_tokens": 1, "temperature": 0, "logit_bias": {str(token): -100}})
    assert r.status_code == 200, r.text
    assert structured(r.json())[0] != text


@pytest.fixture(scope="module")
def llama_server_url(real_model: Path, tmp_path_factory: pytest.TempPathFactory):
    # The chat template the appliance picks for this GGUF (none inside): llama.cpp's built-in `gemma`.
    args = ["--no-jinja", "--chat-template", "gemma", "-t", "2", "-c", "1024", "-np", "1"]
    with llama_server(real_model, args, tmp_path_factory.mktemp("llama-server"), timeout=120) as url:
        yield url


CITY_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20},
                   "capital": {"type": "boolean"}, "rank": {"type": "integer"}},
    "required": ["name", "country", "capital", "rank"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("question", ["Describe Paris as JSON.", "Give me a city in Japan as JSON."])
def test_a_schema_constrained_answer_is_held_as_llama_servers_is(gemma, llama_server_url, question):
    """Greedy, the same schema through OpenAI's response_format, against llama.cpp's own server: both
    answers complete, parse and validate, with the properties in the schema's order. Token-for-token
    equality is not asserted: on this model the two servers' logits differ by a few hundredths of a
    log-probability even without a grammar (measured: -0.68 against -0.69 for the first token), which
    flips near-ties (two and four spaces of indent: -0.85 against -0.93 here, -0.86 against -0.87
    there). The grammar's whitespace is llama.cpp's own (`space`, as common/json-schema-to-grammar.cpp
    has it), so either server may lay the JSON out as the model prefers."""
    body = {"messages": [{"role": "user", "content": question}], "temperature": 0, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA,
                                                                        "strict": True}}}
    theirs = requests.post(llama_server_url + "/v1/chat/completions", json=body, timeout=300)
    assert theirs.status_code == 200, theirs.text
    r = gemma.post("/v1/chat/completions", json={"model": GEMMA, **body}, timeout=300)
    assert r.status_code == 200, r.text
    for answer in (r.json(), theirs.json()):
        text, finish = structured(answer)
        assert finish == "stop", text
        value = json.loads(text)
        jsonschema.validate(value, CITY_SCHEMA)
        assert list(value) == list(CITY_SCHEMA["properties"])
    assert 'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}' in schema_gbnf(CITY_SCHEMA)
