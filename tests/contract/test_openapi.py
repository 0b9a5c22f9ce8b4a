"""spec/openapi.yaml against the app: routes both ways, every response's shape, request schemas vs the parser.

Every request below goes through `api` (conftest.SpecClient), which validates the status, headers and
body of each response against the spec as it arrives, and the exact Error shape of every error.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import falcon
import falcon.testing
import pytest
import yaml
from jsonschema import Draft202012Validator

from appliance.engine.events import Failed
from appliance.settings import Settings
from appliance.web.app import ROUTES, create_app
from appliance.web.errors import EngineFailure, Forbidden, RateLimited, Unauthorized
from appliance.web.schemas import (
    ChatRequest,
    ChatTokensRequest,
    CompletionRequest,
    CompletionTokensRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    LoadModelRequest,
    RerankRequest,
    TokenizeRequest,
    UnloadModelRequest,
)
from tests.contract.conftest import add_reranker

SPEC_PATH = Path(__file__).resolve().parents[2] / "spec" / "openapi.yaml"


def load_spec_operations() -> set[tuple[str, str]]:
    doc = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return {(p, m.upper()) for p, item in doc["paths"].items() for m in item if m in HTTP_METHODS}


HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
FIXED_NOW = 1_700_000_000.0  # the wall clock the conftest's `app` runs on

FULL_TEXT = "Hello, wörld!"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}
COMPLETION = {"model": "tiny", "prompt": "Say hello"}


# ---------------------------------------------------------------------------------------------
# The spec document itself


def _walk(node: Any, path: str = "#"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}/{str(k).replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def test_spec_parses_as_openapi_31(spec, fixed_now):
    assert spec.path == SPEC_PATH and fixed_now == FIXED_NOW and spec.http_methods == HTTP_METHODS
    text = SPEC_PATH.read_text(encoding="utf-8")
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    assert "\t" not in text
    assert str(doc["openapi"]).startswith("3.1.")
    assert set(doc) <= {"openapi", "info", "jsonSchemaDialect", "servers", "paths", "webhooks", "components", "security", "tags", "externalDocs"}
    assert doc["info"]["title"] and doc["info"]["version"]
    assert set(doc["components"]) <= {
        "schemas", "responses", "parameters", "examples", "requestBodies", "headers", "securitySchemes", "links", "callbacks", "pathItems",
    }
    for name in doc.get("security", []):
        assert set(name) <= set(doc["components"]["securitySchemes"])


def test_every_ref_resolves(spec):
    refs = [(where, node["$ref"]) for where, node in _walk(spec.doc) if isinstance(node, dict) and isinstance(node.get("$ref"), str)]
    assert refs
    for where, ref in refs:
        assert ref.startswith("#/"), f"{where}: only local references are used: {ref}"
        try:
            spec.pointer(ref)
        except (KeyError, IndexError, ValueError):
            pytest.fail(f"{where}: $ref {ref} does not resolve")


def test_every_component_is_used(spec):
    used = {node["$ref"] for _, node in _walk(spec.doc) if isinstance(node, dict) and isinstance(node.get("$ref"), str)}
    for kind in ("schemas", "responses", "parameters", "requestBodies", "headers"):
        for name in spec.doc["components"].get(kind, {}):
            if kind == "responses" and name in ("NotFound", "MethodNotAllowed"):
                continue  # the answers for unlisted paths and methods, referred to from info.description
            assert f"#/components/{kind}/{name}" in used, f"components/{kind}/{name} is never referenced"


def test_schemas_are_valid_draft_2020_12(spec):
    for _name, schema in spec.doc["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
    for _where, node in _walk(spec.doc["paths"]):
        if isinstance(node, dict) and "schema" in node and isinstance(node["schema"], dict):
            Draft202012Validator.check_schema(node["schema"])


def test_operations_are_well_formed(spec):
    ids = []
    for path, item in spec.doc["paths"].items():
        assert path.startswith("/") and (path == "/" or not path.endswith("/")), path
        assert set(item) <= set(HTTP_METHODS) | {"summary", "description", "parameters", "servers", "$ref"}, path
        for method, op in item.items():
            if method not in HTTP_METHODS:
                continue
            ids.append(op["operationId"])
            assert op.get("summary"), f"{method} {path}: no summary"
            assert op["responses"], f"{method} {path}: no responses"
            for status, resp in op["responses"].items():
                assert status == "default" or (status.isdigit() and 100 <= int(status) < 600), status
                resp = spec.resolve(resp)
                assert resp.get("description"), f"{method} {path} {status}: a response needs a description"
                assert "X-Request-Id" in resp.get("headers", {}), f"{method} {path} {status}: X-Request-Id not declared"
                for ctype in resp.get("content", {}):
                    assert "/" in ctype
                if int(status) >= 400:
                    schema = resp["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, f"{method} {path} {status}: not the Error schema"
            for p in op.get("parameters", []):
                p = spec.resolve(p)
                assert p["in"] in ("query", "header", "path", "cookie") and p["name"] and "schema" in p
            if "requestBody" in op:
                body = spec.resolve(op["requestBody"])
                assert "application/json" in body["content"]
    assert len(ids) == len(set(ids)), "operationIds must be unique"


_ALLOWED_KEYS = {
    "response": {"description", "headers", "content", "links"},
    "media": {"schema", "example", "examples", "encoding"},
    "header": {"description", "required", "deprecated", "schema", "content", "style", "explode", "example", "examples"},
    "parameter": {"name", "in", "description", "required", "deprecated", "allowEmptyValue", "schema", "content", "style", "explode", "allowReserved", "example", "examples"},
    "requestBody": {"description", "content", "required"},
}


def _check_keys(kind: str, obj: dict, where: str) -> None:
    if "$ref" in obj:
        assert set(obj) <= {"$ref", "summary", "description"}, f"{where}: a Reference Object has only $ref/summary/description"
        return
    extra = {k for k in obj if not k.startswith("x-")} - _ALLOWED_KEYS[kind]
    assert not extra, f"{where}: {kind} object does not allow {sorted(extra)}"


def test_objects_have_only_their_openapi_fields(spec):
    """What openapi-spec-validator checks about fixed fields, for the objects this spec uses."""
    responses = dict(spec.doc["components"]["responses"])
    for path, item in spec.doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                responses.update({f"{method} {path} {s}": r for s, r in op["responses"].items()})
                for i, p in enumerate(op.get("parameters", [])):
                    _check_keys("parameter", p, f"{method} {path} parameters[{i}]")
                if "requestBody" in op:
                    _check_keys("requestBody", op["requestBody"], f"{method} {path} requestBody")
    for where, resp in responses.items():
        _check_keys("response", resp, where)
        for name, header in resp.get("headers", {}).items():
            _check_keys("header", header, f"{where} header {name}")
        for ctype, media in resp.get("content", {}).items():
            _check_keys("media", media, f"{where} {ctype}")
    for name, header in spec.doc["components"]["headers"].items():
        _check_keys("header", header, f"components/headers/{name}")
    for name, p in spec.doc["components"]["parameters"].items():
        _check_keys("parameter", p, f"components/parameters/{name}")
    for name, body in spec.doc["components"]["requestBodies"].items():
        _check_keys("requestBody", body, f"components/requestBodies/{name}")
        for ctype, media in body["content"].items():
            _check_keys("media", media, f"components/requestBodies/{name} {ctype}")


def test_every_error_status_has_a_response_component(spec):
    responses = spec.doc["components"]["responses"]
    declared = set()
    for _, item in spec.doc["paths"].items():
        for method, op in item.items():
            if method in HTTP_METHODS:
                declared |= {int(s) for s in op["responses"] if s.isdigit() and int(s) >= 400}
    assert declared | {404, 405} >= {400, 401, 403, 404, 405, 409, 413, 415, 429, 500, 503}
    for name in ("MethodNotAllowed", "NotFound"):
        assert responses[name]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert "Allow" in responses["MethodNotAllowed"]["headers"]
    for name in ("RateLimited", "Unavailable"):
        assert "Retry-After" in responses[name]["headers"]


# ---------------------------------------------------------------------------------------------
# Routes: what Falcon serves == what the spec lists


def _served(app: falcon.App) -> set[tuple[str, str]]:
    """(path, METHOD) for every responder defined on a routed resource (not Falcon's defaults)."""
    served = set()
    router = app._router
    for path, _key, suffix in ROUTES:
        resource, method_map, _params, template = router.find(path)
        assert template == path
        for method, responder in method_map.items():
            if inspect.ismethod(responder) and responder.__self__ is resource:
                expected = f"on_{method.lower()}" + (f"_{suffix}" if suffix else "")
                assert responder.__name__ == expected, f"{path} {method}: {responder.__name__} != {expected}"
                served.add((path, method))
        # and the other direction: every responder the resource has for this suffix is routed
        tail = f"_{suffix}" if suffix else ""
        for name, _ in inspect.getmembers(resource, inspect.ismethod):
            if not name.startswith("on_"):
                continue
            method, _, rest = name[3:].partition("_")
            if (f"_{rest}" if rest else "") == tail:
                assert (path, method.upper()) in served, f"{path}: responder {name} is not routed"
    return served


def test_routes_are_unique():
    paths = [p for p, _, _ in ROUTES]
    assert len(paths) == len(set(paths))


def test_falcon_serves_exactly_the_spec_operations(app, spec):
    served = _served(app)
    listed = spec.operations()
    assert served - listed == set(), f"served but missing from the spec: {sorted(served - listed)}"
    assert listed - served == set(), f"in the spec but not served: {sorted(listed - served)}"


def test_every_spec_path_is_in_routes(spec):
    assert set(spec.doc["paths"]) == {p for p, _, _ in ROUTES}


# ---------------------------------------------------------------------------------------------
# Request schemas vs the pydantic models


def _properties(spec, schema: dict) -> dict:
    schema = spec.resolve(schema)
    props = dict(schema.get("properties", {}))
    for sub in schema.get("allOf", []):
        props.update(_properties(spec, sub))
    return props


def _required(spec, schema: dict) -> set:
    schema = spec.resolve(schema)
    req = set(schema.get("required", []))
    for sub in schema.get("allOf", []):
        req |= _required(spec, sub)
    return req


@pytest.mark.parametrize(
    "name, model",
    [("CompletionRequest", CompletionRequest), ("ChatRequest", ChatRequest), ("LoadModelRequest", LoadModelRequest), ("UnloadModelRequest", UnloadModelRequest),
     ("TokenizeRequest", TokenizeRequest), ("DetokenizeRequest", DetokenizeRequest), ("ChatTokensRequest", ChatTokensRequest),
     ("CompletionTokensRequest", CompletionTokensRequest), ("EmbeddingRequest", EmbeddingRequest),
     ("RerankRequest", RerankRequest)],
)
def test_request_schema_fields_match_the_parser(spec, name, model):
    schema = {"$ref": f"#/components/schemas/{name}"}
    props = _properties(spec, schema)
    assert set(props) == set(model.model_fields), f"{name}: spec {sorted(set(props) ^ set(model.model_fields))} differ"
    required = {k for k, f in model.model_fields.items() if f.is_required()}
    assert _required(spec, schema) == required


def test_original_appliance_fields_are_documented(spec):
    props = _properties(spec, {"$ref": "#/components/schemas/CompletionRequest"})
    for field in ("n_threads", "n_ctx", "seed"):
        assert len(props[field].get("description", "")) > 40, f"{field}: describe its semantics"
    assert "largest" in props["n_threads"]["description"] and "capped" in props["n_threads"]["description"]
    assert "400" in props["n_ctx"]["description"]
    legacy = _properties(spec, {"$ref": "#/components/schemas/LegacyChatRequest"})
    assert {"model-name", "prompt", "max-token", "device"} <= set(legacy)


def _chat_body_schema(spec):
    return spec.resolve(spec.doc["components"]["requestBodies"]["Chat"])["content"]["application/json"]["schema"]


def test_chat_body_is_one_of_openai_or_legacy(spec):
    schema = _chat_body_schema(spec)
    refs = [s["$ref"] for s in schema["oneOf"]]
    assert refs == ["#/components/schemas/ChatRequest", "#/components/schemas/LegacyChatRequest"]
    v = spec.validator(schema)
    assert v.is_valid(CHAT)
    assert v.is_valid({"model-name": "tiny", "prompt": "Hi", "max-token": 5, "device": "cpu"})
    # both shapes at once: the server takes the OpenAI one, and the spec matches exactly one
    assert v.is_valid({**CHAT, "model-name": "tiny", "prompt": "x"})


# A table of bodies: the spec's request schema accepts exactly those the server does not answer 400.
COMPLETION_CASES = [
    ({}, True),
    ({"prompt": ["one prompt"]}, True),
    ({"prompt": [1, 5, 9]}, True),
    ({"prompt": []}, False),
    ({"prompt": ["a", "b"]}, False),
    ({"prompt": [1, "a"]}, False),
    ({"prompt": [-1]}, False),
    ({"prompt": 5}, False),
    ({"model": ""}, False),
    ({"model": None}, False),
    ({"n": 1}, True),
    ({"n": 2}, True),  # the fake model's two slots (more is a 400 naming n: the spec cannot know the model)
    ({"n": 2, "stream": True}, True),
    ({"n": 2, "stream": True, "stream_options": {"include_usage": True}}, True),
    ({"n": 2, "logprobs": 1}, True),
    ({"n": 0}, False),
    ({"n": 129}, False),
    ({"n": None}, False),
    ({"echo": True}, True),
    ({"echo": True, "stream": True}, True),
    ({"echo": True, "logprobs": 1}, False),
    ({"echo": True, "logprobs": None}, True),
    ({"echo": False}, True),
    ({"suffix": None}, True),
    ({"best_of": 0}, False),
    ({"best_of": 2, "n": 2}, True),
    ({"best_of": 1}, True),
    ({"temperature": 1}, True),
    ({"temperature": 0.0}, True),
    ({"temperature": 2.5}, False),
    ({"temperature": "1"}, False),
    ({"top_p": 1.5}, False),
    ({"top_k": -1}, False),
    ({"min_p": 0.1}, True),
    ({"repeat_penalty": 0}, False),
    ({"repeat_penalty": 1.1}, True),
    ({"repeat_last_n": -1}, True),
    ({"repeat_last_n": -2}, False),
    ({"presence_penalty": -2.5}, False),
    ({"frequency_penalty": 1}, True),
    ({"max_tokens": 0}, False),
    ({"max_tokens": -1}, True),
    ({"max_tokens": -2}, False),
    ({"max_tokens": 3}, True),
    ({"max_tokens": True}, False),
    ({"seed": -1}, True),
    ({"seed": -2}, False),
    ({"seed": 2**64 - 1}, True),
    ({"seed": 2**64}, False),
    ({"seed": 1.5}, False),
    ({"n_threads": 0}, False),
    ({"n_threads": 2}, True),
    ({"n_threads": 1025}, False),
    ({"n_ctx": 0}, False),
    ({"n_ctx": 128}, True),
    ({"n_ctx": "128"}, False),
    ({"stop": ""}, False),
    ({"stop": [""]}, False),
    ({"stop": "\n"}, True),
    ({"stop": ["a", "b"]}, True),
    ({"stop": 3}, False),
    ({"logit_bias": {"5": 1.0}}, True),
    ({"logit_bias": {"5": -100, "6": 100}}, True),
    ({"logit_bias": {}}, True),
    ({"logit_bias": {"5": 100.5}}, False),
    ({"logit_bias": {"5": "1"}}, False),
    ({"logit_bias": {"five": 1}}, False),
    ({"logit_bias": {"05": 1}}, False),
    ({"logit_bias": {"-1": 1}}, False),
    ({"grammar": 'root ::= "yes" | "no"'}, True),
    ({"grammar": ""}, True),
    ({"grammar": 5}, False),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "boolean"}}}}, True),
    ({"json_schema": "{}"}, False),
    ({"response_format": {"type": "text"}}, True),
    ({"response_format": {"type": "json_object"}}, True),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "boolean"}, "strict": True}}}, True),
    ({"response_format": {"type": "json_schema"}}, False),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": []}}}, False),
    ({"response_format": {"type": "xml"}}, False),
    ({"response_format": "json"}, False),
    ({"stream_options": {"include_usage": True}}, False),
    ({"stream": True, "stream_options": {"include_usage": True}}, True),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, False),
    ({"stream": None}, False),
    ({"ignore_eos": True}, True),
    ({"logprobs": 2}, True),
    ({"logprobs": -1}, False),
    ({"logprobs": 101}, False),
    ({"user": "someone", "metadata": {"a": 1}}, True),
]

CHAT_CASES = [
    ({}, True),
    ({"messages": []}, False),
    ({"messages": [{"role": "robot", "content": "x"}]}, False),
    ({"messages": [{"content": "x"}]}, False),
    ({"messages": [{"role": "system", "content": "Be brief"}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}, True),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, False),
    ({"messages": [{"role": "user", "content": None}]}, True),
    ({"messages": [{"role": "user", "content": "x", "name": "n" * 257}]}, False),
    ({"messages": "Hi"}, False),
    ({"top_logprobs": 2}, False),
    ({"logprobs": True, "top_logprobs": 2}, True),
    ({"logprobs": True}, True),
    ({"logprobs": 1}, False),
    ({"tools": [{"type": "function"}]}, False),
    ({"tools": []}, True),
    ({"device": "tpu"}, False),
    ({"device": "cpu"}, True),
    ({"max_completion_tokens": 0}, False),
    ({"max_completion_tokens": -1}, False),
    ({"max_completion_tokens": 3}, True),
    ({"max_tokens": 3, "max_completion_tokens": 2}, True),
    ({"n": 2}, True),
    ({"n": 2, "stream": True}, True),
    ({"n": 0}, False),
    ({"n_ctx": 128, "n_threads": 2, "seed": 7}, True),
    ({"stream": True}, True),
]

LEGACY_CASES = [
    ({"model-name": "tiny", "prompt": "Hi"}, True),
    ({"model-name": "tiny", "prompt": "Hi", "max-token": 3, "device": "cpu"}, True),
    ({"model-name": "tiny", "prompt": "Hi", "max-token": 0}, False),
    ({"model-name": "tiny", "prompt": "Hi", "device": "tpu"}, False),
    ({"model-name": "", "prompt": "Hi"}, False),
    ({"model-name": 5, "prompt": "Hi"}, False),
    ({"model-name": "tiny", "prompt": 5}, False),
    ({"model-name": "tiny", "prompt": "Hi", "temperature": 5}, False),
    ({"model-name": "tiny", "prompt": "Hi", "stream": True, "n_ctx": 128}, True),
]

LOAD_CASES = [
    ({"model_name": "new", "model_path": "@FILE"}, True),
    ({"model_name": "new-1.q8_0:v2/x@y+z", "model_path": "@FILE", "n_ctx": 128, "parallel": 2, "n_gpu_layers": -1, "n_threads": 2}, True),
    ({"model_name": "-new", "model_path": "@FILE"}, False),
    ({"model_name": "new model", "model_path": "@FILE"}, False),
    ({"model_name": "n" * 129, "model_path": "@FILE"}, False),
    ({"model_name": "new"}, False),
    ({"model_name": "new", "model_path": ""}, False),
    ({"model_name": "new", "model_path": "@FILE", "n_ctx": 63}, False),
    ({"model_name": "new", "model_path": "@FILE", "parallel": 0}, False),
    ({"model_name": "new", "model_path": "@FILE", "n_gpu_layers": -2}, False),
    ({"model_name": "new", "model_path": "@FILE", "n_threads": 0}, False),
]


def _agree(api, spec, path, body, expect_valid):
    validator = spec.request_validator(path, "POST")
    assert validator.is_valid(body) == expect_valid, f"spec {'rejects' if expect_valid else 'accepts'} {body}"
    r = api.post(path, body)
    if expect_valid:
        assert r.status == 200, f"{body}: the spec accepts it but the server answered {r.status}: {r.json}"
    else:
        assert r.status == 400, f"{body}: the spec rejects it but the server answered {r.status}"
        assert r.json["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/completions"])
@pytest.mark.parametrize("extra, valid", COMPLETION_CASES, ids=[json.dumps(c[0])[:60] for c in COMPLETION_CASES])
def test_completion_request_schema_agrees_with_the_server(api, spec, path, extra, valid):
    _agree(api, spec, path, {**COMPLETION, **extra}, valid)


@pytest.mark.parametrize("extra, valid", CHAT_CASES, ids=[json.dumps(c[0])[:60] for c in CHAT_CASES])
def test_chat_request_schema_agrees_with_the_server(api, spec, extra, valid):
    _agree(api, spec, "/v1/chat/completions", {**CHAT, **extra}, valid)


@pytest.mark.parametrize("body, valid", LEGACY_CASES, ids=[json.dumps(c[0])[:60] for c in LEGACY_CASES])
def test_legacy_chat_request_schema_agrees_with_the_server(api, spec, body, valid):
    _agree(api, spec, "/chat/completions", body, valid)


@pytest.mark.parametrize("body, valid", LOAD_CASES, ids=[json.dumps(c[0])[:60] for c in LOAD_CASES])
def test_load_request_schema_agrees_with_the_server(api, spec, tmp_path, body, valid):
    f = tmp_path / "new.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    body = {k: (str(f) if v == "@FILE" else v) for k, v in body.items()}
    _agree(api, spec, "/load_model", body, valid)


# ---------------------------------------------------------------------------------------------
# 200 responses, route by route (the client validates each against the spec)


def test_completion_json(api, registry):
    for path in ("/v1/completions", "/completions"):
        r = api.post(path, COMPLETION)
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("application/json")
        choice = r.json["choices"][0]
        assert choice["text"] == FULL_TEXT and choice["finish_reason"] == "stop" and choice["logprobs"] is None
        assert r.json["model"] == "tiny" and r.json["created"] == int(FIXED_NOW)
        usage = r.json["usage"]
        prompt_len = 1 + len(COMPLETION["prompt"])  # BOS + one token per character
        assert usage["prompt_tokens"] == prompt_len and usage["completion_tokens"] == 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["prompt_tokens_details"]["cached_tokens"] == 2
        t = r.json["timings"]
        assert t["prompt_n"] == prompt_len - 2 and t["predicted_n"] == 4
        assert t["predicted_per_second"] == round(4 / 0.030, 3)


def test_completion_defaults_to_16_tokens_and_honours_max_tokens(api, registry):
    api.post("/v1/completions", COMPLETION)
    assert registry.engine("tiny").submitted[-1].max_tokens == 16
    r = api.post("/v1/completions", {**COMPLETION, "max_tokens": 2})
    assert r.json["choices"][0]["text"] == "Hello," and r.json["choices"][0]["finish_reason"] == "length"


def test_completion_with_token_ids_and_logprobs(api):
    r = api.post("/v1/completions", {"model": "tiny", "prompt": [1, 10, 11], "logprobs": 2})
    assert r.status == 200
    lp = r.json["choices"][0]["logprobs"]
    assert lp["tokens"] == ["Hello", ",", " wörld", "!"]
    assert lp["text_offset"] == [0, 5, 6, 12]
    assert all(len(top) == 2 for top in lp["top_logprobs"])


def test_chat_json(api):
    for path in ("/v1/chat/completions", "/chat/completions"):
        r = api.post(path, {**CHAT, "logprobs": True, "top_logprobs": 1})
        assert r.status == 200
        choice = r.json["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": FULL_TEXT}
        assert choice["finish_reason"] == "stop"
        content = choice["logprobs"]["content"]
        assert [c["token"] for c in content] == ["Hello", ",", " wörld", "!"]
        assert content[2]["bytes"] == list(" wörld".encode())
        assert len(content[0]["top_logprobs"]) == 1
        assert r.json["object"] == "chat.completion" and r.json["id"].startswith("chatcmpl-")


def test_legacy_chat_shape(api, registry):
    r = api.post("/chat/completions", {"model-name": "tiny", "prompt": "Hi", "max-token": 3, "device": "auto"})
    assert r.status == 200 and r.json["object"] == "chat.completion"
    assert r.json["model"] == "tiny" and r.json["choices"][0]["message"]["content"] == "Hello, wörld"
    assert registry.engine("tiny").submitted[-1].max_tokens == 3


def test_per_request_n_threads_and_n_ctx_reach_the_engine(api, registry):
    r = api.post("/v1/completions", {**COMPLETION, "n_threads": 3, "n_ctx": 32, "seed": 2**32 + 5})
    assert r.status == 200
    req = registry.engine("tiny").submitted[-1]
    assert req.n_threads == 3 and req.n_ctx == 32
    assert req.sampling.seed == 5  # only the low 32 bits are used
    r = api.post("/v1/chat/completions", {**CHAT, "n_threads": 2, "n_ctx": 100})
    req = registry.engine("tiny").submitted[-1]
    assert r.status == 200 and req.n_threads == 2 and req.n_ctx == 100


def test_models_list(api, registry):
    registry.add("warming", state="loading")
    registry.add("broken", state="failed")
    for path in ("/v1/models", "/models"):
        r = api.get(path)
        assert r.status == 200
        assert [m["id"] for m in r.json["data"]] == ["tiny"]
        assert r.json["data"][0]["created"] == int(FIXED_NOW)
        assert r.json["data"][0]["meta"]["n_ctx"] == 256


def test_status_lists_every_model(api, registry):
    registry.add("warming", state="loading")
    registry.add("broken", state="failed")
    r = api.get("/status")
    assert r.status == 200
    assert {m["name"]: m["state"] for m in r.json["models"]} == {"tiny": "ready", "warming": "loading", "broken": "failed"}
    assert r.json["uptime_seconds"] == 0


def test_health(api):
    assert api.get("/health").json == {"status": "ok"}
    assert api.get("/health/").status == 200  # trailing slash ignored


def test_readiness(api, registry):
    r = api.get("/readiness")
    assert r.status == 200 and r.json == {"status": "ready", "models": ["tiny"]}
    registry.engine("tiny").healthy = False
    r = api.get("/readiness")
    assert r.status == 503 and r.json["error"]["code"] == "not_ready" and r.headers["Retry-After"] == "1"


def test_metrics(api):
    api.post("/v1/completions", COMPLETION)
    r = api.get("/metrics")
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    assert 'appliance_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in r.result.text
    assert 'appliance_slots{model="tiny"} 2.0' in r.result.text


def test_load_and_unload(api, registry, tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    r = api.post("/load_model", {"model_name": "second", "model_path": str(f), "n_ctx": 128, "parallel": 3})
    assert r.status == 200 and r.json["status"] == "loaded"
    assert r.json["model"]["name"] == "second" and r.json["model"]["slots"] == 3 and r.json["model"]["n_ctx"] == 128
    assert r.json["model"]["path"] == str(f)
    assert r.json["model"]["state"] == "ready"
    r = api.post("/load_model", {"model_name": "second", "model_path": str(f)})
    assert r.status == 409 and r.json["error"]["code"] == "conflict" and r.json["error"]["param"] == "model_name"
    r = api.post("/unload_model", {"model_name": "second"})
    assert r.status == 200 and r.json == {"status": "unloaded", "model": {"name": "second"}}
    r = api.post("/unload_model", {"model_name": "second"})
    assert r.status == 404 and r.json["error"]["code"] == "model_not_found"


def test_every_operation_has_a_validated_200(api, spec, registry, tmp_path):
    """One successful call per spec operation, each validated by the client against the spec."""
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    bodies = {
        "/v1/completions": COMPLETION,
        "/completions": COMPLETION,
        "/v1/chat/completions": CHAT,
        "/chat/completions": CHAT,
        "/load_model": {"model_name": "x", "model_path": str(f)},
        "/unload_model": {"model_name": "x"},
        "/tokenize": {"model": "tiny", "content": "hello", "with_pieces": True},
        "/detokenize": {"model": "tiny", "tokens": [46, 43]},
        "/v1/completions/input_tokens": COMPLETION,
        "/completions/input_tokens": COMPLETION,
        "/v1/chat/completions/input_tokens": CHAT,
        "/chat/completions/input_tokens": CHAT,
        "/v1/embeddings": {"model": "tiny", "input": ["hello", "world"]},
        "/v1/rerank": {"model": "rr", "query": "q", "documents": ["a", "bbb", "cc"], "return_documents": True},
    }
    queries = {"/v1/attestation": "nonce=" + "ab" * 32}
    registry.add("tiny", embeddings=True)
    add_reranker(registry, "rr")  # /status shows it too
    paths = {"/ui/{name}": "/ui/app.js"}
    for path, method in sorted(spec.operations() - STATEFUL, key=lambda pm: pm[0] == "/unload_model"):
        kw = {"json": bodies[path]} if method == "POST" else {}
        if path in queries:
            kw["query_string"] = queries[path]
        r = api.request(method, paths.get(path, path), **kw)
        assert r.status == 200, f"{method} {path}: {r.status} {r.json}"
    assert {(p, m) for m, p, s in api.seen if s == 200} == spec.operations() - STATEFUL


STATEFUL = {(p, m) for p, m in load_spec_operations() if p.startswith(("/v1/responses", "/v1/conversations"))}
"""The Responses and Conversations APIs: each needs ids made by an earlier call, so their validated 200s
are in test_responses_contract.py (which checks it covers every one of them)."""


def test_rerank_refuses_a_model_that_is_not_a_reranker(api, spec, registry):
    r = api.request("POST", "/v1/rerank", json={"model": "tiny", "query": "q", "documents": ["a", "b"]})
    assert r.status == 400 and r.json["error"]["code"] == "model_not_reranker" and r.json["error"]["param"] == "model"
    registry.add("emb", embeddings=True)  # an embedding model is no reranker either
    r = api.request("POST", "/v1/rerank", json={"model": "emb", "query": "q", "documents": ["a", "b"]})
    assert r.status == 400 and r.json["error"]["code"] == "model_not_reranker" and r.json["error"]["param"] == "model"
    r = api.request("POST", "/v1/rerank", json={"model": "nope", "query": "q", "documents": ["a"]})
    assert r.status == 404


def test_rerank_answers_best_first_in_llama_servers_shape(api, registry):
    add_reranker(registry, "rr")
    docs = ["a", "bbbb", "", "cc"]
    r = api.post("/v1/rerank", {"model": "rr", "query": "qq", "documents": docs})
    assert r.status == 200
    assert list(r.json) == ["model", "object", "usage", "results"] and r.json["model"] == "rr"
    assert r.json["object"] == "list"
    assert [x["index"] for x in r.json["results"]] == [1, 3, 0, 2]  # the fake scores longer documents higher
    assert r.json["results"][0] == {"index": 1, "relevance_score": pytest.approx(0.2)}
    assert r.json["usage"] == {"prompt_tokens": 4 * 4 + 7, "total_tokens": 4 * 4 + 7}  # BOS, query, EOS each
    r = api.post("/v1/rerank", {"model": "rr", "query": "qq", "documents": docs, "top_n": 2, "return_documents": True})
    assert r.json["results"] == [{"index": 1, "relevance_score": pytest.approx(0.2), "document": {"text": "bbbb"}},
                                 {"index": 3, "relevance_score": 0.0, "document": {"text": "cc"}}]
    assert r.json["usage"]["prompt_tokens"] == 23  # every document is scored, whatever top_n keeps
    r = api.post("/v1/rerank", {"model": "rr", "query": "qq", "documents": docs, "top_n": 99})
    assert len(r.json["results"]) == 4


@pytest.mark.parametrize("body, param, code", [
    ({"query": "q", "documents": []}, "documents", None),
    ({"query": "q"}, "documents", None),
    ({"documents": ["a"]}, "query", None),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n", None),
    ({"query": "q", "documents": ["a", 3]}, "documents", None),
    ({"query": "q", "documents": ["a", "x" * 40]}, "documents", "context_length_exceeded"),
    ({"query": "q" * 40, "documents": ["a"]}, "query", "context_length_exceeded"),
    ({"query": "a\ud800b", "documents": ["a"]}, "query", None),
])
def test_rerank_refusals_name_the_field(api, registry, body, param, code):
    add_reranker(registry, "rr")
    r = api.post("/v1/rerank", {"model": "rr", **body})  # json.dumps writes a lone surrogate as an escape
    assert r.status == 400, r.json
    assert r.json["error"]["param"] == param, r.json
    if code:
        assert r.json["error"]["code"] == code
    assert api.post("/v1/rerank", {"model": "rr", "query": "q", "documents": ["a"]}).status == 200


# ---------------------------------------------------------------------------------------------
# Streaming


def _chunks(r):
    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-store" and r.headers["X-Accel-Buffering"] == "no"
    assert r.events[-1] == "[DONE]"
    return r.events[:-1]


def test_completion_stream(api, registry):
    for path in ("/v1/completions", "/completions"):
        chunks = _chunks(api.post(path, {**COMPLETION, "stream": True}))
        assert "".join(c["choices"][0]["text"] for c in chunks) == FULL_TEXT
        assert all(c["object"] == "text_completion" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        *body, last = chunks
        assert all(c["choices"][0]["finish_reason"] is None and "usage" not in c for c in body)
        assert last["choices"][0]["finish_reason"] == "stop"
        assert last["usage"]["completion_tokens"] == 4 and last["timings"]["predicted_n"] == 4
    assert all(g.closed for g in registry.engine("tiny").generations)


def test_chat_stream(api):
    for path in ("/v1/chat/completions", "/chat/completions"):
        chunks = _chunks(api.post(path, {**CHAT, "stream": True, "logprobs": True}))
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == FULL_TEXT
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert all(c["choices"][0]["logprobs"]["content"] for c in chunks[1:-1])
        last = chunks[-1]
        assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "stop"
        assert last["usage"]["prompt_tokens_details"]["cached_tokens"] == 2 and "timings" in last


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_stream_include_usage(api, path, body):
    chunks = _chunks(api.post(path, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    *_, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["usage"] is None and "timings" in finish
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("path, body", [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)])
def test_n_choices_stream_and_not(api, path, body):
    # The fake engine replays its script once per choice; usage counts the prompt once.
    one = api.post(path, body).json
    two = api.post(path, {**body, "n": 2}).json
    assert [c["index"] for c in two["choices"]] == [0, 1]
    assert two["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert two["usage"]["completion_tokens"] == 2 * one["usage"]["completion_tokens"]
    chunks = _chunks(api.post(path, {**body, "n": 2, "stream": True}))
    key = "text" if path == "/v1/completions" else "delta"
    for i in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        text = "".join(c[key] if key == "text" else c[key].get("content", "") for c in mine)
        assert text == FULL_TEXT and mine[-1]["finish_reason"] == "stop"
    usages = [c["usage"] for c in chunks if c.get("usage")]
    assert len(usages) == 1 and usages[0] == two["usage"]


def test_echo_prepends_the_prompt_to_each_choice(api):
    r = api.post("/v1/completions", {**COMPLETION, "echo": True, "n": 2}).json
    assert [c["text"] for c in r["choices"]] == [COMPLETION["prompt"] + FULL_TEXT] * 2
    chunks = _chunks(api.post("/v1/completions", {**COMPLETION, "echo": True, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in chunks) == COMPLETION["prompt"] + FULL_TEXT


def test_choices_over_the_slots_and_a_suffix_without_fim_tokens_are_refused(api):
    r = api.post("/v1/completions", {**COMPLETION, "n": 3})
    assert r.status == 400 and r.json["error"]["param"] == "n"
    r = api.post("/v1/chat/completions", {**CHAT, "n": 3, "stream": True})
    assert r.status == 400 and r.json["error"]["param"] == "n"
    r = api.post("/v1/completions", {**COMPLETION, "suffix": "tail"})
    assert r.status == 400 and r.json["error"]["param"] == "suffix" and r.json["error"]["code"] == "fim_not_supported"
    # counting the tokens of that body reads its suffix too (the prompt would be a FIM layout)
    r = api.post("/v1/completions/input_tokens", {**COMPLETION, "suffix": "tail"})
    assert r.status == 400 and r.json["error"]["param"] == "suffix" and r.json["error"]["code"] == "fim_not_supported"


def test_legacy_chat_stream(api):
    chunks = _chunks(api.post("/chat/completions", {"model-name": "tiny", "prompt": "Hi", "stream": True}))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == FULL_TEXT


def test_stream_failure_ends_with_an_error_event(api, registry):
    # The error event is the last data event; the signed final checkpoint and [DONE] follow it.
    registry.engine("tiny").fail_with = Failed(EngineFailure())
    r = api.post("/v1/chat/completions", {**CHAT, "stream": True})
    assert r.status == 200
    assert r.events[-2] == {"error": {"message": EngineFailure().message, "type": "server_error", "param": None, "code": "engine_error"}}
    assert r.events[-1] == "[DONE]"
    assert '"finish_reason":"error"' in r.result.text
    registry.engine("tiny").fail_with = RuntimeError("secret detail /etc/passwd")
    r = api.post("/v1/completions", {**COMPLETION, "stream": True})
    assert r.events[-2]["error"]["code"] == "internal_error"
    assert "secret" not in r.result.text


# ---------------------------------------------------------------------------------------------
# Errors: each validated against the spec (status declared, Error schema, headers) by the client


def _raw(api, method, path, body: bytes, ctype: str | None = "application/json"):
    headers = {"Content-Type": ctype} if ctype else {}
    return api.request(method, path, body=body, headers=headers)


def test_unknown_route_is_404(api):
    for method, path in [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1")]:
        r = api.request(method, path)
        assert r.status == 404 and r.json["error"]["code"] == "not_found"


def test_unlisted_method_is_405_with_allow(api):
    for method, path, kw in [
        ("GET", "/v1/completions", {}),
        ("PUT", "/v1/chat/completions", {"json": CHAT}),
        ("DELETE", "/v1/models", {}),
        ("GET", "/load_model", {}),
        ("PATCH", "/status", {}),
        ("POST", "/v1/models", {"json": {}}),
    ]:
        r = api.request(method, path, **kw)
        assert r.status == 405 and r.json["error"]["code"] == "method_not_allowed"
        assert method not in r.headers["Allow"]


@pytest.mark.parametrize("path", ["/health", "/v1/models", "/metrics"])
def test_post_to_a_get_route_is_405_whatever_the_body(app, path):
    r = falcon.testing.TestClient(app).simulate_post(path, body=b"not json", headers={"Content-Type": "text/plain"})
    assert r.status_code == 405


def test_bad_json_is_400(api):
    for path in ("/v1/completions", "/v1/chat/completions", "/load_model", "/unload_model"):
        r = _raw(api, "POST", path, b'{"model": ')
        assert r.status == 400 and r.json["error"]["message"] == "The request body is not valid JSON"


def test_body_must_be_an_object(api):
    r = _raw(api, "POST", "/v1/completions", b"[1, 2]")
    assert r.status == 400 and "JSON object" in r.json["error"]["message"]


def test_deep_nesting_is_400(api):
    deep = b'{"model": "tiny", "prompt": "x", "metadata": ' + b"[" * 40 + b"]" * 40 + b"}"
    r = _raw(api, "POST", "/v1/completions", deep)
    assert r.status == 400 and "nests deeper" in r.json["error"]["message"]


def test_wrong_content_type_is_415(api):
    for ctype in ("text/plain", None, "application/x-www-form-urlencoded"):
        r = _raw(api, "POST", "/v1/completions", json.dumps(COMPLETION).encode(), ctype)
        assert r.status == 415 and r.json["error"]["code"] == "unsupported_media_type"
    r = _raw(api, "POST", "/v1/completions", json.dumps(COMPLETION).encode(), "application/json; charset=utf-8")
    assert r.status == 200


def test_oversized_body_is_413(api):
    body = json.dumps({**COMPLETION, "prompt": "x" * 5000}).encode()
    r = _raw(api, "POST", "/v1/completions", body)
    assert r.status == 413 and r.json["error"]["code"] == "payload_too_large"


def test_unknown_model_is_404(api):
    for path, body in [
        ("/v1/completions", {**COMPLETION, "model": "nope"}),
        ("/v1/chat/completions", {**CHAT, "model": "nope"}),
        ("/chat/completions", {"model-name": "nope", "prompt": "Hi"}),
        ("/unload_model", {"model_name": "nope"}),
    ]:
        r = api.post(path, body)
        assert r.status == 404 and r.json["error"]["code"] == "model_not_found"
        assert r.json["error"]["param"] in ("model", "model_name")


def test_failed_model_is_404_and_loading_model_is_503(api, registry):
    registry.add("broken", state="failed")
    registry.add("warming", state="loading")
    r = api.post("/v1/completions", {**COMPLETION, "model": "broken"})
    assert r.status == 404
    for path, body in [("/v1/completions", {**COMPLETION, "model": "warming"}), ("/v1/chat/completions", {**CHAT, "model": "warming"})]:
        r = api.post(path, body)
        assert r.status == 503 and r.json["error"]["code"] == "not_ready" and r.headers["Retry-After"] == "1"
    r = api.post("/unload_model", {"model_name": "warming"})
    assert r.status == 409


def test_readiness_without_models_is_503(api, registry):
    registry.stop_all()
    r = api.get("/readiness")
    assert r.status == 503 and r.headers["Retry-After"] == "1"


def test_load_missing_file_is_400(api, tmp_path):
    r = api.post("/load_model", {"model_name": "m", "model_path": str(tmp_path / "none.gguf")})
    assert r.status == 400 and r.json["error"]["param"] == "model_path"


def test_n_ctx_above_the_slot_context_is_400(api):
    r = api.post("/v1/completions", {**COMPLETION, "n_ctx": 257})
    assert r.status == 400 and r.json["error"]["param"] == "n_ctx" and "256" in r.json["error"]["message"]
    r = api.post("/v1/completions", {**COMPLETION, "n_ctx": 256})
    assert r.status == 200


def test_prompt_beyond_the_request_context_is_400(api):
    r = api.post("/v1/completions", {**COMPLETION, "n_ctx": 8})
    assert r.status == 400 and r.json["error"]["code"] == "context_length_exceeded"
    r = api.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x" * 300}]})
    assert r.status == 400 and r.json["error"]["code"] == "context_length_exceeded"


def test_integers_follow_json_schema(api, spec):
    """JSON Schema counts 2.0 and 1e1 as integers, so the server does (schemathesis found the mismatch);
    2.5 is not one, and NaN / Infinity are not JSON at all."""
    for value in (2.0, 1e1):
        assert spec.request_validator("/v1/completions", "POST").is_valid({**COMPLETION, "max_tokens": value})
        r = api.post("/v1/completions", {**COMPLETION, "max_tokens": value})
        assert r.status == 200, r.text
        assert r.json["usage"]["completion_tokens"] <= int(value)
    assert not spec.request_validator("/v1/completions", "POST").is_valid({**COMPLETION, "max_tokens": 2.5})
    r = api.post("/v1/completions", {**COMPLETION, "max_tokens": 2.5})
    assert r.status == 400 and r.json["error"]["param"] == "max_tokens"
    for constant in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps(COMPLETION)[:-1] + f', "temperature": {constant}}}'
        r = api.request("POST", "/v1/completions", body=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status == 400 and "not valid JSON" in r.json["error"]["message"], (constant, r.text)


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"prompt": [1, 64]}, "prompt"),
        ("/v1/completions", {"max_tokens": 8193}, "max_tokens"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"stop": [str(i) for i in range(9)]}, "stop"),
        ("/v1/completions", {"stop": "s" * 257}, "stop"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("/v1/chat/completions", {"max_tokens": 8193}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 8193}, "max_completion_tokens"),
    ],
)
def test_configured_limits_are_400_naming_the_field(api, path, extra, param):
    base = COMPLETION if path == "/v1/completions" else CHAT
    r = api.post(path, {**base, **extra})
    assert r.status == 400 and r.json["error"]["param"] == param


def test_chat_template_errors_are_400(api, registry):
    registry.add("strict", chat_template="{{ raise_exception('only user turns') }}")
    r = api.post("/v1/chat/completions", {**CHAT, "model": "strict"})
    assert r.status == 400 and r.json["error"]["param"] == "messages"


def test_chat_without_a_template_is_a_400_naming_the_setting(api, registry):
    registry.add("bare", chat_template=None)
    r = api.post("/v1/chat/completions", {**CHAT, "model": "bare"})
    assert r.status == 400 and r.json["error"]["code"] == "no_chat_template" and r.json["error"]["param"] == "model"
    assert "chat_template" in r.json["error"]["message"]
    assert api.post("/v1/completions", {**COMPLETION, "model": "bare"}).status == 200
    models = {m["name"]: m["chat_template"] for m in api.get("/status").json["models"]}
    assert models["bare"] is None and models["tiny"] == {"source": "config", "name": "chatml"}


def test_a_long_chat_renders_its_builtin_template_off_the_event_loop(registry, make_api):
    app, state = create_app(Settings.model_validate({"limits": {"max_body_bytes": 65536}}), models=registry)
    api = make_api(app, state.identity.public_raw)
    registry.add("roomy", n_ctx=100_000)
    content = "x" * 5000  # above the inline limit: llama.cpp renders it in the hub's thread pool
    r = api.post("/v1/chat/completions", {**CHAT, "model": "roomy", "messages": [{"role": "user", "content": content}]})
    assert r.status == 200
    prompt = f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    assert len(registry.engine("roomy").submitted[-1].prompt) == 1 + len(prompt)  # BOS + one token per character


def test_engine_crash_is_a_generic_500(api, registry):
    registry.engine("tiny").raise_on_submit = RuntimeError("secret detail /etc/passwd")
    r = api.post("/v1/completions", COMPLETION)
    assert r.status == 500 and r.json["error"]["code"] == "internal_error"
    assert "secret" not in r.result.text
    registry.engine("tiny").raise_on_submit = None
    registry.engine("tiny").fail_with = Failed(EngineFailure())
    r = api.post("/v1/chat/completions", CHAT)
    assert r.status == 500 and r.json["error"]["code"] == "engine_error"


class _Refuse:
    def __init__(self, error) -> None:
        self.error = error

    def process_resource(self, req, resp, resource, params) -> None:
        if resource is not None:
            raise self.error


@pytest.mark.parametrize(
    "error, status, code",
    [
        (Unauthorized("Missing API key"), 401, "invalid_api_key"),
        (Forbidden("The admin scope is required"), 403, "forbidden"),
        (RateLimited("Slow down", headers={"Retry-After": "7"}), 429, "rate_limit_exceeded"),
    ],
)
def test_trust_layer_errors_have_the_spec_shape(settings, registry, make_api, error, status, code):
    """The trust layer is middleware; its refusals leave through the same error handler."""
    app, state = create_app(settings, models=registry, extra_middleware=[_Refuse(error)])
    api = make_api(app, state.identity.public_raw)
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/load_model"), ("GET", "/status")]:
        r = api.request(method, path, **({"json": CHAT} if method == "POST" else {}))
        assert r.status == status and r.json["error"]["code"] == code
        if status == 429:
            assert r.headers["Retry-After"] == "7"


# ---------------------------------------------------------------------------------------------
# Every error anywhere: exactly the Error shape


SWEEP_BODIES: list[tuple[bytes | None, str | None]] = [
    (None, None),
    (b"", "application/json"),
    (b"{", "application/json"),
    (b"null", "application/json"),
    (b'"text"', "application/json"),
    (b"{}", "application/json"),
    (b'{"model": "tiny"}', "application/json"),
    (b'{"model": "tiny", "prompt": "x", "n": 3}', "application/json"),
    (b'{"model": "tiny", "prompt": "x", "suffix": "y"}', "application/json"),
    (b'{"model-name": "tiny"}', "application/json"),
    (b'{"model_name": "tiny"}', "application/json"),
    (b"{}", "text/plain"),
]


def test_every_error_response_has_exactly_the_error_shape(app, make_api):
    """A sweep of methods x paths x bodies: every >= 400 answer is exactly the Error shape.

    `SpecClient.check` also asserts that each status is one the spec declares for the operation (or
    404/405 for unlisted paths and methods), and validates the body against the spec.
    """
    api = make_api(app)
    paths = [p for p, _, _ in ROUTES] + ["/nope", "/v1", "/v1/completions/extra"]
    errors = 0
    for path in paths:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
            for body, ctype in SWEEP_BODIES if method in ("POST", "PUT", "PATCH") else [(None, None)]:
                if method == "POST" and path in ("/health", "/readiness", "/metrics", "/status", "/v1/models", "/models") and ctype != "application/json":
                    continue  # answered 415 instead of 405: see test_post_to_a_get_route_is_405_whatever_the_body
                if method == "POST" and path in ("/health", "/readiness", "/metrics", "/status", "/v1/models", "/models") and body in (b"", b"{"):
                    continue  # answered 400 instead of 405, same cause
                headers = {"Content-Type": ctype} if ctype else {}
                r = api.request(method, path, body=body, headers=headers)
                if r.status >= 400:
                    errors += 1
                    assert set(r.json) == {"error"} and set(r.json["error"]) == {"message", "type", "param", "code"}
    assert errors > 100


def test_request_id_is_echoed_or_replaced(api):
    r = api.get("/health", headers={"X-Request-Id": "client-id.42"})
    assert r.headers["X-Request-Id"] == "client-id.42"
    r = api.get("/health", headers={"X-Request-Id": "bad id with spaces"})
    assert r.headers["X-Request-Id"] != "bad id with spaces" and len(r.headers["X-Request-Id"]) == 32
    r = api.get("/nope", headers={"X-Request-Id": "err-1"})
    assert r.status == 404 and r.headers["X-Request-Id"] == "err-1"


def test_options_is_the_framework_default(api, spec):
    for path in spec.doc["paths"]:
        r = api.request("OPTIONS", path)
        assert r.status == 200 and r.result.text == ""


@pytest.mark.parametrize("path, body, param", [("/v1/completions", None, "prompt"), ("/v1/chat/completions", "chat", "messages")])
def test_prompt_token_cap_is_400(registry, make_api, path, body, param):
    settings = Settings.model_validate({"limits": {"max_prompt_tokens": 8}})
    app, state = create_app(settings, models=registry)
    api = make_api(app, state.identity.public_raw)
    payload = {**CHAT} if body == "chat" else {**COMPLETION, "prompt": "x" * 20}
    r = api.post(path, payload)
    assert r.status == 400 and r.json["error"]["param"] == param and "at most 8" in r.json["error"]["message"]
    ok = api.post("/v1/completions", {**COMPLETION, "prompt": "abc"})
    assert ok.status == 200
