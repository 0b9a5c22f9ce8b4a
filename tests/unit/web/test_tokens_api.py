"""The tokenizing routes in-process: llama-server's /tokenize and /detokenize shapes, the input-token
counts that equal a request's usage.prompt_tokens, the refusals, each response signed; and, with the
real registry on a synthetic model, tokenizing on a pool thread."""

from __future__ import annotations

import threading

import falcon.testing
import pytest

from appliance.settings import Settings
from appliance.web.app import create_app
from appliance.web.resources.tokens import shown
from appliance.web.schemas import MAX_DETOKENIZE_TOKENS
from tests.conftest import FakeRegistry
from tests.conftest import SignedClient as Client
from tests.conftest import openai_error as error

CHAT = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}


@pytest.fixture
def registry() -> FakeRegistry:
    reg = FakeRegistry()
    reg.add("tiny")
    return reg


@pytest.fixture
def api(registry) -> Client:
    app, _ = create_app(Settings.model_validate({"limits": {"max_body_bytes": 4 << 20}}), models=registry)
    return Client(app)


# ---------------------------------------------------------------------------------------------
# /tokenize and /detokenize


def test_tokenize_gives_ids_without_bos_by_default_as_llama_server(api, registry):
    model = registry.engine("tiny").model
    r = api.post("/tokenize", {"model": "tiny", "content": "hello world"})
    assert r.status_code == 200 and r.json == {"tokens": model.tokenize("hello world", add_special=False)}
    r = api.post("/tokenize", {"model": "tiny", "content": "hello world", "add_special": True})
    assert r.json["tokens"][0] == model.bos and r.json["tokens"][1:] == model.tokenize("hello world", add_special=False)


def test_tokenize_with_pieces_gives_each_id_with_its_text(api):
    r = api.post("/tokenize", {"model": "tiny", "content": "hello world", "with_pieces": True, "add_special": True})
    assert r.status_code == 200
    tokens = r.json["tokens"]
    assert tokens[0] == {"id": 1, "piece": "<s>"}  # control tokens spelt out, as llama-server shows them
    assert all(set(t) == {"id", "piece"} for t in tokens)
    assert "".join(t["piece"] for t in tokens[1:]) == "hello world"


def test_a_piece_that_is_not_utf8_is_its_byte_values():
    assert shown(b" w\xc3\xb6rld") == " wörld"
    assert shown(b"\xc3") == [0xC3]
    assert shown(b"\xf0\x93") == [0xF0, 0x93]
    assert shown(b"") == ""


def test_detokenize_round_trips_and_spells_out_control_tokens(api):
    ids = api.post("/tokenize", {"model": "tiny", "content": "hello world"}).json["tokens"]
    r = api.post("/detokenize", {"model": "tiny", "tokens": ids})
    assert r.status_code == 200 and r.json == {"content": "hello world"}
    assert api.post("/detokenize", {"model": "tiny", "tokens": [1, *ids, 2]}).json == {"content": "<s>hello world</s>"}
    assert api.post("/detokenize", {"model": "tiny", "tokens": []}).json == {"content": ""}
    # half a character on its own: replaced, as llama-server's JSON encoder does
    assert api.post("/detokenize", {"model": "tiny", "tokens": [0]}).json == {"content": "\ufffd"}


def test_model_may_be_left_out_while_exactly_one_is_ready(api, registry):
    assert api.post("/tokenize", {"content": "hi"}).status_code == 200
    assert api.post("/detokenize", {"tokens": [46], "model": None}).json == {"content": "h"}
    registry.add("loading", state="loading")
    assert api.post("/tokenize", {"content": "hi"}).status_code == 200  # only "tiny" is ready
    registry.add("other")
    for path, body in (("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [46]})):
        err = error(api.post(path, body), 404)
        assert err["param"] == "model" and err["code"] == "model_not_found" and "2 are" in err["message"]
    assert api.post("/tokenize", {"model": "other", "content": "hi"}).status_code == 200


def test_no_model_ready_and_none_named_is_a_404(registry):
    """A valid body: which model it means depends on what is loaded, so a 404 like an unknown name
    (schemathesis found the 400 this was once: a schema-valid request refused as invalid)."""
    registry.unload("tiny")
    app, _ = create_app(Settings(), models=registry)
    err = error(Client(app).post("/tokenize", {"content": "hi"}), 404)
    assert err["param"] == "model" and "0 are" in err["message"]


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "content": "hi"}, 404, "model"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
    ("/tokenize", {"model": "tiny"}, 400, "content"),
    ("/tokenize", {"model": "tiny", "content": 5}, 400, "content"),
    ("/tokenize", {"model": "tiny", "content": ["hi"]}, 400, "content"),
    ("/tokenize", {"model": "tiny", "content": "hi", "add_special": "yes"}, 400, "add_special"),
    ("/tokenize", {"model": "tiny", "content": "hi", "with_pieces": 1}, 400, "with_pieces"),
    ("/tokenize", {"model": "", "content": "hi"}, 400, "model"),
    ("/detokenize", {"model": "tiny"}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": 5}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": "1 2"}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [1, 64]}, 400, "tokens"),  # the fake's vocabulary is 64
    ("/detokenize", {"model": "tiny", "tokens": [1 << 40]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [True]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": [1.5]}, 400, "tokens"),
    ("/detokenize", {"model": "tiny", "tokens": ["1"]}, 400, "tokens"),
])
def test_bad_input_is_an_openai_error_naming_the_field(api, path, body, status, param):
    err = error(api.post(path, body), status)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"
    if status == 404:
        assert err["code"] == "model_not_found"
    assert api.post("/tokenize", {"model": "tiny", "content": "hi"}).status_code == 200  # still serving


def test_an_id_outside_the_vocabulary_is_named(api):
    err = error(api.post("/detokenize", {"model": "tiny", "tokens": [1, 64]}), 400)
    assert err["message"] == "tokens: token ids must be within the model's vocabulary"


def test_detokenize_takes_at_most_the_documented_number_of_ids(api):
    ok = api.post("/detokenize", {"model": "tiny", "tokens": [3] * MAX_DETOKENIZE_TOKENS})
    assert ok.status_code == 200 and len(ok.json["content"]) == MAX_DETOKENIZE_TOKENS
    err = error(api.post("/detokenize", {"model": "tiny", "tokens": [3] * (MAX_DETOKENIZE_TOKENS + 1)}), 400)
    assert err["param"] == "tokens"


def test_a_loading_model_is_a_503(api, registry):
    registry.add("slow", state="loading")
    err = error(api.post("/tokenize", {"model": "slow", "content": "hi"}), 503)
    assert err["code"] == "not_ready"


# ---------------------------------------------------------------------------------------------
# Input-token counts


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_chat_input_tokens_equal_the_chat_completions_prompt_tokens(api, prefix):
    for body in (CHAT, {**CHAT, "messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                          {"type": "text", "text": "b"}],
                                              "name": "ann"}]}):
        r = api.post(f"{prefix}/chat/completions/input_tokens", body)
        assert r.status_code == 200 and set(r.json) == {"object", "input_tokens"}
        assert r.json["object"] == "response.input_tokens"
        done = api.post(f"{prefix}/chat/completions", {**body, "max_tokens": 1})
        assert done.status_code == 200
        assert r.json["input_tokens"] == done.json["usage"]["prompt_tokens"]


@pytest.mark.parametrize("prefix", ["/v1", ""])
@pytest.mark.parametrize("prompt", ["hello world", ["hello world"], [5, 6, 7]])
def test_completion_input_tokens_equal_the_completions_prompt_tokens(api, prefix, prompt):
    body = {"model": "tiny", "prompt": prompt}
    r = api.post(f"{prefix}/completions/input_tokens", body)
    assert r.status_code == 200 and r.json["object"] == "response.input_tokens"
    done = api.post(f"{prefix}/completions", {**body, "max_tokens": 1})
    assert r.json["input_tokens"] == done.json["usage"]["prompt_tokens"]


def test_input_tokens_read_only_the_prompt_fields(api, registry):
    # Fields a completion would refuse do not matter to a count, and nothing is generated.
    r = api.post("/v1/chat/completions/input_tokens", {**CHAT, "n": 3, "stream": True, "temperature": 9})
    assert r.status_code == 200
    assert registry.engine("tiny").submitted == []


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions/input_tokens", {"messages": CHAT["messages"]}, 400, "model"),
    ("/v1/chat/completions/input_tokens", {**CHAT, "messages": []}, 400, "messages"),
    ("/v1/chat/completions/input_tokens", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions/input_tokens", {**CHAT, "model": "nope"}, 404, "model"),
    ("/v1/completions/input_tokens", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("/v1/completions/input_tokens", {"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions/input_tokens", {"model": "tiny", "prompt": [1, 99]}, 400, "prompt"),
    ("/v1/completions/input_tokens", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions/input_tokens", {"model": "nope", "prompt": "x"}, 404, "model"),
])
def test_bad_count_requests_are_openai_errors(api, path, body, status, param):
    assert error(api.post(path, body), status)["param"] == param


def test_a_chat_count_to_a_model_without_a_template_is_the_chats_400(api, registry):
    registry.add("plain", chat_template=None)
    err = error(api.post("/v1/chat/completions/input_tokens", {**CHAT, "model": "plain"}), 400)
    assert err["code"] == "no_chat_template"


# ---------------------------------------------------------------------------------------------
# The real registry: llama.cpp's tokenizer, on a pool thread


@pytest.fixture(scope="module")
def real_registry(tmp_path_factory):
    from appliance.engine.registry import ModelRegistry
    from tools.modelgen import ModelSpec, write_model

    try:
        path = write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", path, n_ctx=256, parallel=1, n_threads=1))
    yield reg
    reg.stop_all()


def test_tokenizing_runs_on_a_pool_thread_never_the_callers(real_registry, monkeypatch):
    import appliance.engine.registry as registry_module

    threads: list[int] = []

    def spy(fn):
        def wrapped(*args, **kwargs):
            threads.append(threading.get_ident())
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(registry_module, "content_tokens", spy(registry_module.content_tokens))
    monkeypatch.setattr(registry_module, "token_pieces", spy(registry_module.token_pieces))
    app, _ = create_app(Settings(), models=real_registry)
    api = Client(app)
    model = real_registry.get("tiny").model
    text = "Hello, wörld! <s> 1 2 3"
    r = api.post("/tokenize", {"content": text, "with_pieces": True})
    assert r.status_code == 200
    ids = [t["id"] for t in r.json["tokens"]]
    assert ids == model.tokenize(text, add_special=False, parse_special=True)
    back = api.post("/detokenize", {"tokens": ids}).json["content"]
    assert back.lstrip(" ") == text  # an SPM vocabulary adds a leading space, as llama-server shows too
    assert "".join(p if isinstance(p, str) else bytes(p).decode() for p in (t["piece"] for t in r.json["tokens"])) == back
    assert len(threads) == 3 and threading.get_ident() not in threads
    bos = api.post("/tokenize", {"content": "Hi", "add_special": True, "with_pieces": True}).json["tokens"][0]
    assert bos["id"] == model.bos and bos["piece"] == model.token_text(model.bos)
    err = error(api.post("/detokenize", {"tokens": [model.n_vocab]}), 400)
    assert err["param"] == "tokens"


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", b'{"content": "a\\ud800b"}', "content"),
    ("/v1/completions/input_tokens", b'{"model": "tiny", "prompt": "a\\udfffb"}', "prompt"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
])
def test_a_lone_surrogate_is_a_400_not_a_500(real_registry, path, body, param):
    """JSON can spell half a UTF-16 pair (Python's parser keeps it in the string); UTF-8 cannot."""
    app, _ = create_app(Settings(), models=real_registry)
    r = falcon.testing.TestClient(app).simulate_post(path, body=body, headers={"Content-Type": "application/json"})
    err = error(r, 400)
    assert err["param"] == param and "lone surrogate" in err["message"]
