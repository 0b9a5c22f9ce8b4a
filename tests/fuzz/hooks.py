"""schemathesis hooks for `make fuzz` (SCHEMATHESIS_HOOKS=tests.fuzz.hooks): the appliance's own checks.

Every response, whatever schemathesis sent, must carry a valid RFC 9421 signature from the key that
`/v1/keys` publishes, bound to the request as sent (a stream: its in-band signature over the whole
transcript). The one 5xx the contract allows is `/readiness` answering `503 not_ready` while no model
is ready (the stateful phase unloads models); any other 5xx fails `not_a_server_error`.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from urllib.parse import urlsplit

import requests
import schemathesis

from attestation import signing
from tests.contract.conftest import Spec, load_spec, sse_events

_KEY: list[object] = []


def _public_key() -> object:
    if not _KEY and os.environ.get("APPLIANCE_FUZZ_PUBLIC_KEY"):  # tests/integration/test_fuzz.py: a wrong key
        _KEY.append(signing.public_key_from_b64(os.environ["APPLIANCE_FUZZ_PUBLIC_KEY"]))
    if not _KEY:
        url = os.environ["APPLIANCE_FUZZ_URL"]
        r = requests.get(url + "/v1/keys", timeout=30)
        r.raise_for_status()
        pk = signing.public_key_from_b64(r.json()["public_key"])
        signing.verify_response(pk, request=signing.RequestInfo("GET", "/v1/keys"), status=r.status_code,
                                headers=dict(r.headers), body=r.content)
        _KEY.append(pk)
    return _KEY[0]


_CONSTRAINTS = ("response_format", "grammar", "json_schema")
_CALLS = [0]


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    """Point generated bodies at what exists, so requests reach the engine instead of stopping at a 404.
    schemathesis revalidates a case edited here, so positive and negative stay correctly labelled.

    - every other `model` names the served model (generated names almost never exist);
    - every other `model_path` names a real GGUF, so loads run for real with generated settings
      (n_ctx up to 2^20 and parallel up to 256 must be refused, never OOM-killed);
    - the served model is never unloaded (every later request would be a 404);
    - every other body setting several of response_format / grammar / json_schema keeps only the first
      (more than one is refused, and generated bodies nearly always set all three).
    """
    body = case.body
    if not isinstance(body, dict):
        return
    _CALLS[0] += 1
    odd = _CALLS[0] % 2 == 1
    served = os.environ.get("APPLIANCE_FUZZ_MODEL_NAME")
    path = os.environ.get("APPLIANCE_FUZZ_MODEL_PATH")
    if case.operation.path == "/unload_model":
        if served and body.get("model_name") == served:
            body["model_name"] = served + "-not-served"
        return
    if odd and served and isinstance(body.get("model"), str):
        body["model"] = served
    if odd and path and isinstance(body.get("model_path"), str):
        body["model_path"] = path
    present = [k for k in _CONSTRAINTS if k in body]
    if odd and len(present) > 1:
        for k in present[1:]:
            del body[k]


def _header(headers, name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


@schemathesis.check
def response_is_signed(ctx, response, case) -> None:
    """The signature verifies against the request exactly as it went on the wire."""
    req = response.request
    parts = urlsplit(req.url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = req.body or b""
    body = body.encode() if isinstance(body, str) else body
    info = signing.RequestInfo(req.method, target, body, _header(req.headers, signing.NONCE_HEADER.lower()),
                               _header(req.headers, "content-digest"))
    headers = {k: ", ".join(v) for k, v in response.headers.items()}
    if response.stream_cut_short or len(response.content) != response.content_size:
        raise AssertionError("the body was not read whole: raise max-stream-events in tests/fuzz/schemathesis.toml")
    common = dict(request=info, status=response.status_code, headers=headers,
                  max_age=datetime.timedelta(minutes=10))
    try:
        if headers.get("content-type", "").startswith("text/event-stream"):
            signing.verify_stream(_public_key(), transcript=response.content, **common)
        else:
            signing.verify_response(_public_key(), body=response.content, **common)
    except signing.VerificationError as exc:
        raise AssertionError(f"the response signature does not verify: {exc}") from None


SEMANTIC_PARAMS = frozenset(
    {"grammar", "json_schema", "response_format", "logit_bias", "tokens", "prompt", "n_ctx", "n", "suffix", "best_of",
     "input", "dimensions", "text", "tools", "tool_choice", "prediction", "items"}
)
"""Fields whose validity a JSON Schema cannot say: a grammar must parse as GBNF, a JSON schema must use the
keywords the converter supports, token ids must be in the model's vocabulary, a prompt's tokens and a
request's n_ctx must fit the model's context, `n` its parallel slots, a `suffix` needs FIM tokens, and
`best_of` must equal `n`, an embedding input's token ids must be in the vocabulary and `dimensions` at
most the model's embedding size; a response's `text` format schema must use the converter's keywords, and
its `input` must give something to respond to (a conversation may hold no items); a tool's `parameters`
must use the converter's keywords, and a named `tool_choice` must be one of the `tools`; a `prediction` is
for one choice (not with `n` > 1); a function call item's `arguments` (in `input` or a conversation's
`items`) must be JSON text. A schema-valid body may
still be refused there, with a 400 that names the field."""


@schemathesis.check
def positive_data_accepted(ctx, response, case) -> None:
    """positive_data_acceptance for the generation routes (off there in schemathesis.toml): a schema-valid
    body is accepted, except for a 400 naming one of SEMANTIC_PARAMS (or a prompt over the context)."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 400:
        return
    if not re.fullmatch(r"(/v1)?/(chat/)?completions(/input_tokens)?|/tokenize|/detokenize|/v1/embeddings|/v1/responses"
                        r"|/v1/conversations(/\{conversation_id\}/items)?", case.operation.path):
        return
    try:
        error = json.loads(response.content)["error"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError("a 400 without the OpenAI error shape") from None
    if error.get("param") in SEMANTIC_PARAMS or error.get("code") == "context_length_exceeded":
        return
    raise AssertionError(f"a schema-valid body was refused: {error.get('message')!r} (param {error.get('param')!r})")


_SPEC: list[Spec] = []


@schemathesis.check
def stream_events_conform(ctx, response, case) -> None:
    """Each event of a stream is the spec's x-sse-data-schema (a chunk or an error), the last `[DONE]`
    unless an error ended it: what schemathesis cannot read from an OpenAPI 3.1 event-stream schema."""
    if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        return
    if not _SPEC:
        _SPEC.append(Spec(load_spec()))
    spec = _SPEC[0]
    media = spec.response(case.operation.path, case.method, response.status_code)["content"]["text/event-stream"]
    validator = spec.validator(media["x-sse-data-schema"])
    events = sse_events(response.content.decode("utf-8"))
    if not events:
        raise AssertionError("an empty event stream")
    for i, data in enumerate(events):
        if data == media["x-sse-terminator"]:
            if i != len(events) - 1:
                raise AssertionError(f"{data} before the last event")
            continue
        obj = json.loads(data)
        errors = sorted(validator.iter_errors(obj), key=lambda e: e.path)
        if errors:
            raise AssertionError(f"event {i} breaks the spec: {errors[0].message} at {list(errors[0].path)}")
        if "error" in obj and events[i + 1:] != [media["x-sse-terminator"]]:
            raise AssertionError("an error event must be the last before [DONE]")
    if events[-1] != media["x-sse-terminator"]:
        raise AssertionError("the stream did not end with [DONE]")


@schemathesis.check
def readiness_503_is_not_ready(ctx, response, case) -> None:
    """`not_a_server_error` is off for /readiness alone (tests/fuzz/schemathesis.toml); this is its rule there."""
    if case.operation.path != "/readiness" or response.status_code < 500:
        return
    try:
        code = json.loads(response.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = None
    if response.status_code != 503 or code != "not_ready":
        raise AssertionError(f"/readiness answered {response.status_code} {code!r}; only 503 not_ready is allowed")


@schemathesis.hook
def after_call(context, case, response) -> None:
    """APPLIANCE_FUZZ_TRACE=FILE: one line per call (generation mode, operation, status, error message),
    to see what the fuzz reached."""
    trace = os.environ.get("APPLIANCE_FUZZ_TRACE")
    if not trace:
        return
    mode = case.meta.generation.mode.value if case.meta is not None else "-"
    message = ""
    if response.status_code >= 400:
        try:
            message = json.loads(response.content)["error"]["message"][:160]
        except (ValueError, KeyError, TypeError):
            message = "(not the OpenAI error shape)"
    with open(trace, "a", encoding="utf-8") as f:
        f.write(f"{mode}\t{case.method} {case.operation.path}\t{response.status_code}\t{message}\n")
