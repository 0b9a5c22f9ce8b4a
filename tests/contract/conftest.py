"""Contract-tier fixtures: the spec, schema validation against it, and a small deterministic fake engine.

The fake stands in for llama.cpp and the scheduler only; everything between the WSGI call and
`engine.submit()` (middleware, routing, parsing, response shaping, error handling) is the real code.
Every response that goes through `api` is checked against spec/openapi.yaml as it happens, so any
test that makes a request is also a contract test.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import falcon.testing
import numpy as np
import pytest
import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from appliance.settings import Settings
from appliance.web.app import create_app
from tests.conftest import FIXED_NOW, FakeEmbeddingJob, FakeEngine, FakeGeneration, FakeModel, FakeRegistry

__all__ = ["FakeEngine", "FakeGeneration", "FakeModel", "FakeRegistry",  # the root conftest's, for this tier
           "FakeReranker", "add_reranker"]
from attestation import signing

SPEC_PATH = Path(__file__).resolve().parents[2] / "spec" / "openapi.yaml"
SPEC_URI = "urn:appliance:openapi"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
ERROR_KEYS = {"message", "type", "param", "code"}


# ---------------------------------------------------------------------------------------------
# The spec and validation against it


def load_spec() -> dict:
    with open(SPEC_PATH, encoding="utf-8") as f:
        return yaml.safe_load(f)


class Spec:
    """The parsed spec plus validators whose `$ref`s resolve into the spec document itself.

    Local references (`#/components/...`) are made absolute (`urn:appliance:openapi#/components/...`)
    in a copy registered with `referencing`, so any schema taken from the spec, inline or not,
    validates with its references intact.
    """

    def __init__(self, doc: dict) -> None:
        self.doc = doc
        resource = Resource(contents=absolute_refs(doc), specification=DRAFT202012)
        self.registry = Registry().with_resource(SPEC_URI, resource)

    def validator(self, schema: dict) -> Draft202012Validator:
        """A validator for a schema taken from (or referring into) the spec, Draft 2020-12."""
        return Draft202012Validator(absolute_refs(schema), registry=self.registry)

    def component(self, name: str) -> Draft202012Validator:
        return self.validator({"$ref": f"#/components/schemas/{name}"})

    def resolve(self, node: Any) -> Any:
        """Follow a local `$ref` (one level at a time, until the node is not a reference)."""
        while isinstance(node, dict) and "$ref" in node and node["$ref"].startswith("#/"):
            node = pointer(self.doc, node["$ref"])
        return node

    http_methods = HTTP_METHODS
    path = SPEC_PATH

    def pointer(self, ref: str) -> Any:
        return pointer(self.doc, ref)

    def route(self, path: str) -> str:
        """The spec path that serves a concrete path: itself, or the template it fills
        (`/v1/responses/resp_...` is `/v1/responses/{response_id}`); unchanged if none does."""
        path = path.split("?", 1)[0].rstrip("/") or "/"
        if path in self.doc["paths"]:
            return path
        for template in self.doc["paths"]:
            if "{" in template and re.fullmatch(re.sub(r"\\{[^/}]+\\}", "[^/]+", re.escape(template)), path):
                return template
        return path

    def operation(self, path: str, method: str) -> dict | None:
        item = self.doc["paths"].get(path)
        return None if item is None else item.get(method.lower())

    def operations(self) -> set[tuple[str, str]]:
        return {(p, m.upper()) for p, item in self.doc["paths"].items() for m in item if m in HTTP_METHODS}

    def response(self, path: str, method: str, status: int) -> dict | None:
        op = self.operation(path, method)
        if op is None:
            return None
        return self.resolve(op["responses"].get(str(status)))

    def request_validator(self, path: str, method: str) -> Draft202012Validator:
        body = self.resolve(self.operation(path, method)["requestBody"])
        return self.validator(body["content"]["application/json"]["schema"])


def absolute_refs(node: Any) -> Any:
    """A copy of `node` whose local `$ref`s point into the registered spec document."""
    if isinstance(node, dict):
        return {
            k: (SPEC_URI + v if k == "$ref" and isinstance(v, str) and v.startswith("#") else absolute_refs(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [absolute_refs(v) for v in node]
    return node


def pointer(doc: Any, ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def assert_valid(validator: Draft202012Validator, instance: Any, what: str) -> None:
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if errors:
        detail = "\n".join(f"  at /{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10])
        pytest.fail(f"{what} does not match the spec:\n{detail}\ninstance: {json.dumps(instance)[:2000]}")


def assert_error_shape(body: Any, status: int) -> None:
    """Exactly {"error": {"message", "type", "param", "code"}}, nothing more or less."""
    assert isinstance(body, dict) and set(body) == {"error"}, f"{status}: not the Error shape: {body!r}"
    err = body["error"]
    assert isinstance(err, dict) and set(err) == ERROR_KEYS, f"{status}: not the Error shape: {body!r}"
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    assert err["param"] is None or isinstance(err["param"], str)
    assert err["code"] is None or isinstance(err["code"], str)


def sse_events(text: str) -> list[str]:
    """The `data:` payloads of an event stream, in order (each event is one `data:` line).

    SSE comment lines (`: ...`, the signed checkpoints) are skipped, as OpenAI clients skip them.
    """
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        lines = block.split("\n")
        assert len(lines) == 1 and lines[0].startswith("data: "), f"unexpected SSE block: {block!r}"
        events.append(lines[0][len("data: ") :])
    assert text.endswith("\n\n"), "the stream must end at an event boundary"
    return events


# ---------------------------------------------------------------------------------------------
# A client that checks every response against the spec


_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class Checked:
    """What the client saw: the raw result and its parsed JSON body or SSE event payloads."""

    result: falcon.testing.Result
    json: Any = None
    events: list[Any] = field(default_factory=list)

    @property
    def status(self) -> int:
        return self.result.status_code

    @property
    def headers(self):
        return self.result.headers


class SpecClient:
    def __init__(self, app, spec: Spec, public_key=None) -> None:
        self.client = falcon.testing.TestClient(app)
        self.spec = spec
        self.seen: list[tuple[str, str, int]] = []
        self._public_key = public_key

    def post(self, path: str, body: Any = None, **kw) -> Checked:
        if body is not None:
            kw["json"] = body
        return self.request("POST", path, **kw)

    def get(self, path: str, **kw) -> Checked:
        return self.request("GET", path, **kw)

    def request(self, method: str, path: str, **kw) -> Checked:
        if "json" in kw:  # send exact bytes, so the signature's request binding can be checked
            kw["body"] = json.dumps(kw.pop("json")).encode()
            kw["headers"] = {"Content-Type": "application/json", **(kw.get("headers") or {})}
        body = kw.get("body") or b""
        body = body.encode() if isinstance(body, str) else body
        result = self.client.simulate_request(method, path, **kw)
        self.verify_signature(method, path, kw, body, result)
        checked = self.check(method, path, result)
        self.seen.append((method, self.spec.route(path), result.status_code))
        return checked

    def verify_signature(self, method: str, path: str, kw: dict, body: bytes, result) -> None:
        """Every response, errors and streams included, verifies against the appliance's key."""
        if self._public_key is None:
            keys = self.client.simulate_get("/v1/keys").json
            self._public_key = signing.public_key_from_b64(keys["public_key"])
        query = kw.get("query_string") or ""
        nonce = (kw.get("headers") or {}).get(signing.NONCE_HEADER) or (kw.get("headers") or {}).get("Appliance-Nonce")
        info = signing.RequestInfo(
            method, path + (f"?{query}" if query else ""), b"" if result.status_code == 413 else body, nonce
        )
        headers = dict(result.headers)
        if "event-stream" in (result.headers.get("Content-Type") or ""):
            verified = signing.verify_stream(
                self._public_key, request=info, status=result.status_code, headers=headers, transcript=result.content
            )
            assert verified.finish_reason is not None
        else:
            signing.verify_response(
                self._public_key, request=info, status=result.status_code, headers=headers, body=result.content
            )

    def check(self, method: str, path: str, result: falcon.testing.Result) -> Checked:
        status = result.status_code
        rid = result.headers.get("X-Request-Id")
        assert rid and _REQUEST_ID.match(rid), f"{method} {path}: missing or bad X-Request-Id: {rid!r}"
        ctype = (result.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
        route = self.spec.route(path)
        op = self.spec.operation(route, method)

        if method == "HEAD":
            assert status in (404, 405), f"HEAD {path}: {status} (no route serves HEAD)"
            return Checked(result)
        if method == "OPTIONS" and op is None and route in self.spec.doc["paths"]:
            return Checked(result)  # the framework's default OPTIONS responder (see the spec's info)

        if op is None:
            # Not an operation of the spec: only the framework's 404/405 may come back.
            if route in self.spec.doc["paths"]:
                assert status == 405, f"{method} {path}: a method the spec does not list answered {status}"
                spec_resp = self.spec.resolve({"$ref": "#/components/responses/MethodNotAllowed"})
            else:
                assert status == 404, f"{method} {path}: a path the spec does not list answered {status}"
                spec_resp = self.spec.resolve({"$ref": "#/components/responses/NotFound"})
        else:
            spec_resp = self.spec.response(route, method, status)
            assert spec_resp is not None, f"{method} {path}: status {status} is not declared in the spec"

        # Headers the spec marks required for this response must be there, and match their schema.
        for name, header in (spec_resp.get("headers") or {}).items():
            header = self.spec.resolve(header)
            value = result.headers.get(name)
            if value is None:
                if header.get("required"):
                    pytest.fail(f"{method} {path} {status}: required header {name} missing")
                continue
            schema = header["schema"]
            instance: Any = value
            if schema.get("type") == "integer":
                assert re.fullmatch(r"\d+", value), f"{name}: {value!r} is not an integer"
                instance = int(value)
            assert_valid(self.spec.validator(schema), instance, f"{method} {path} {status} header {name}")

        content = spec_resp.get("content") or {}
        assert ctype in content, f"{method} {path} {status}: content type {ctype!r} not in the spec's {list(content)}"
        media = content[ctype]
        checked = Checked(result)
        if ctype == "application/json":
            checked.json = json.loads(result.text)
            if status >= 400:
                assert_error_shape(checked.json, status)
            assert_valid(self.spec.validator(media["schema"]), checked.json, f"{method} {path} {status} body")
        elif ctype == "text/event-stream":
            data_validator = self.spec.validator(media["x-sse-data-schema"])
            events = sse_events(result.text)
            assert events, "an empty event stream"
            terminator = media["x-sse-terminator"]
            for i, data in enumerate(events):
                if data == terminator:
                    assert i == len(events) - 1, f"{terminator} must be the last event"
                    checked.events.append(data)
                    continue
                obj = json.loads(data)
                assert_valid(data_validator, obj, f"{method} {path} SSE event {i}")
                if "error" in obj:
                    assert_error_shape(obj, status)
                    assert events[i + 1 :] == [terminator], "an error event must be the last before [DONE]"
                checked.events.append(obj)
            assert checked.events[-1] == terminator, "the stream must end with [DONE]"
        else:
            assert_valid(self.spec.validator(media["schema"]), result.text, f"{method} {path} {status} body")
        return checked


# ---------------------------------------------------------------------------------------------
# A reranker for the fake registry (the root conftest's fakes have embedding models only)


class FakeReranker:
    """The `Embedder` surface of a reranker (pooling rank): a pair is BOS, the query, EOS, the document;
    its score, the document's length less the query's over 10 (so longer documents rank first), as
    llama.cpp gives it: one value, not normalized. The real refusals for a pair past 32 tokens."""

    pooling = "rank"
    dimensions = 1
    n_tokens = 32
    reranks = True

    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def rerank_inputs(self, query: str, documents: list[str]) -> list[list[int]]:
        q = self.model.tokenize(query, add_special=False)
        return [[self.model.bos, *q, self.model.eos, *self.model.tokenize(d, add_special=False)] for d in documents]

    def submit(self, inputs: list[list[int]]) -> FakeEmbeddingJob:
        from appliance.engine.errors import InputTooLong

        for i, tokens in enumerate(inputs):
            if len(tokens) > self.n_tokens:
                raise InputTooLong(index=i, length=len(tokens), limit=self.n_tokens)
        return FakeEmbeddingJob([np.array([(len(t) - 2 * t.index(self.model.eos)) / 10], dtype=np.float32)
                                 for t in inputs])


def add_reranker(registry: FakeRegistry, name: str) -> None:
    """A ready model in the fake registry that is a reranker."""
    rec = registry.add(name)
    rec.embedder = FakeReranker(rec.engine.model)  # type: ignore[assignment]


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def spec() -> Spec:
    return Spec(load_spec())


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("tiny")
    return reg


@pytest.fixture
def settings() -> Settings:
    return Settings.model_validate({"limits": {"max_body_bytes": 4096}})


@pytest.fixture
def app(settings, registry):
    app, _state = create_app(settings, models=registry, wall_clock=lambda: FIXED_NOW)
    return app


@pytest.fixture
def api(app, spec) -> SpecClient:
    return SpecClient(app, spec)


@pytest.fixture
def make_api(spec):
    """A spec-checking client for an app a test built itself."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    def make(app, public_raw: bytes | None = None) -> SpecClient:
        key = Ed25519PublicKey.from_public_bytes(public_raw) if public_raw is not None else None
        return SpecClient(app, spec, key)

    return make


@pytest.fixture
def fixed_now() -> float:
    return FIXED_NOW
