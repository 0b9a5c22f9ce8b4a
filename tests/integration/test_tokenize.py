"""The tokenizing routes on the real server with real weights (Gemma 3 270M): /tokenize and /detokenize
round trips, pieces, BOS; input-token counts equal to the usage.prompt_tokens of the same request;
bad input answered in the OpenAI error shape while the server keeps serving; every response signed.

Two independent references: llama-cpp-python's own tokenizer API (`Llama(vocab_only=True)`) on the same
file, in a child process; and llama.cpp's own llama-server, built from the same sdist by
scripts/llama-server.sh and cached (`make bench` builds it), answering the same requests byte for byte.
The llama-server test is skipped only where that cached build is absent.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from appliance_it import Server, assert_error, llama_server

from attestation import signing

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
TEXTS = [
    "Hello world",
    " leading space, trailing space ",
    "The capital of France is",
    "naïve café 日本語 😀\n\ttabs\n\nand newlines",
    "𓀀 is a hieroglyph outside the vocabulary",  # byte-fallback tokens: pieces that are not UTF-8
    "<start_of_turn>user\nHi<end_of_turn>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Name a colour. 😀"}],
]
MAX_AGE = datetime.timedelta(minutes=5)


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={MODEL: real_model}, config="[model_defaults]\nn_ctx = 1024\nparallel = 1\n",
                          name="gemma-tokens")
    yield server
    server.stop()


def post(server: Server, path: str, body: object) -> requests.Response:
    r = server.post(path, json=body)
    assert r.headers.get("Signature"), r.headers
    return r


def ok(server: Server, path: str, body: object) -> dict:
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    return r.json()


def tokenize(server: Server, text: str, **kw) -> list:
    return ok(server, "/tokenize", {"model": MODEL, "content": text, **kw})["tokens"]


def piece_bytes(piece: str | list[int]) -> bytes:
    return piece.encode() if isinstance(piece, str) else bytes(piece)


def test_tokenize_then_detokenize_gives_back_the_text(gemma):
    for text in TEXTS:
        ids = tokenize(gemma, text)
        assert all(isinstance(t, int) for t in ids)
        assert ok(gemma, "/detokenize", {"model": MODEL, "tokens": ids}) == {"content": text}, text


def test_pieces_concatenate_to_the_text(gemma):
    saw_bytes = False
    for text in TEXTS:
        tokens = tokenize(gemma, text, with_pieces=True)
        assert [t["id"] for t in tokens] == tokenize(gemma, text)
        assert b"".join(piece_bytes(t["piece"]) for t in tokens) == text.encode(), text
        for t in tokens:
            if isinstance(t["piece"], list):  # only where the bytes are not UTF-8 on their own
                saw_bytes = True
                with pytest.raises(UnicodeDecodeError):
                    bytes(t["piece"]).decode()
    assert saw_bytes, "the hieroglyph should have needed byte-fallback tokens"


def test_add_special_adds_bos_and_parse_special_reads_control_tokens(gemma):
    plain = tokenize(gemma, "Hello world")
    with_bos = tokenize(gemma, "Hello world", add_special=True, with_pieces=True)
    assert with_bos[0]["piece"] == "<bos>" and [t["id"] for t in with_bos[1:]] == plain
    bos = with_bos[0]["id"]
    assert ok(gemma, "/detokenize", {"model": MODEL, "tokens": [bos, *plain]}) == {"content": "<bos>Hello world"}
    turn = "<start_of_turn>"
    assert len(tokenize(gemma, turn)) == 1
    assert len(tokenize(gemma, turn, parse_special=False)) > 1


def test_model_may_be_left_out_with_one_model_loaded(gemma):
    assert ok(gemma, "/tokenize", {"content": "Hello world"})["tokens"] == tokenize(gemma, "Hello world")
    assert ok(gemma, "/detokenize", {"tokens": tokenize(gemma, "Hello")}) == {"content": "Hello"}


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_chat_input_tokens_equal_the_chat_completions_usage(gemma, prefix):
    for messages in CHATS:
        body = {"model": MODEL, "messages": messages}
        count = ok(gemma, f"{prefix}/chat/completions/input_tokens", body)
        assert count["object"] == "response.input_tokens"
        done = ok(gemma, f"{prefix}/chat/completions", {**body, "max_tokens": 1, "temperature": 0})
        assert count["input_tokens"] == done["usage"]["prompt_tokens"], messages


@pytest.mark.parametrize("prefix", ["/v1", ""])
def test_completion_input_tokens_equal_the_completions_usage(gemma, prefix):
    for prompt in ("The capital of France is", ["naïve café 😀"], tokenize(gemma, "Hello world", add_special=True)):
        body = {"model": MODEL, "prompt": prompt}
        count = ok(gemma, f"{prefix}/completions/input_tokens", body)
        done = ok(gemma, f"{prefix}/completions", {**body, "max_tokens": 1, "temperature": 0})
        assert count["input_tokens"] == done["usage"]["prompt_tokens"], prompt


BAD = [
    ("/detokenize", {"model": MODEL, "tokens": "1 2 3"}, 400, "tokens", None),
    ("/detokenize", {"model": MODEL, "tokens": {"0": 1}}, 400, "tokens", None),
    ("/detokenize", {"model": MODEL, "tokens": [1, -5]}, 400, "tokens", None),
    ("/detokenize", {"model": MODEL, "tokens": [262144]}, 400, "tokens", None),  # Gemma 3's vocabulary: 262144
    ("/detokenize", {"model": MODEL, "tokens": [1 << 62]}, 400, "tokens", None),
    ("/detokenize", {"model": MODEL, "tokens": [None]}, 400, "tokens", None),
    ("/tokenize", {"model": MODEL, "content": 42}, 400, "content", None),
    ("/tokenize", {"model": MODEL, "content": None}, 400, "content", None),
    ("/tokenize", {"model": MODEL, "content": ["a", 1]}, 400, "content", None),
    ("/tokenize", {"model": "no-such-model", "content": "hi"}, 404, "model", "model_not_found"),
    ("/detokenize", {"model": "no-such-model", "tokens": [1]}, 404, "model", "model_not_found"),
    ("/v1/chat/completions/input_tokens", {"model": "no-such-model", "messages": CHATS[0]}, 404, "model", "model_not_found"),
    ("/v1/chat/completions/input_tokens", {"model": MODEL, "messages": "hi"}, 400, "messages", None),
    ("/v1/completions/input_tokens", {"model": MODEL, "prompt": [0, 262144]}, 400, "prompt", None),
    # half a UTF-16 pair, which JSON can spell and UTF-8 cannot: through llama.cpp's built-in template too
    ("/tokenize", {"model": MODEL, "content": "a\ud800b"}, 400, "content", None),
    ("/v1/chat/completions/input_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "a\udfff"}]},
     400, "messages", None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\udfff"}], "max_tokens": 1},
     400, "messages", None),
]


@pytest.mark.parametrize("path, body, status, param, code", BAD)
def test_bad_input_is_an_openai_error_and_the_server_keeps_serving(gemma, path, body, status, param, code):
    r = post(gemma, path, body)
    assert_error(r, status, "invalid_request_error", param=param, **({"code": code} if code else {}))
    assert gemma.proc.poll() is None
    assert tokenize(gemma, "still here") == tokenize(gemma, "still here")
    assert gemma.get("/health").status_code == 200


def test_every_answer_is_signed_by_the_published_key(gemma):
    keys = gemma.get("/v1/keys").json()
    pk = signing.public_key_from_b64(keys["public_key"])
    for path, body in (("/tokenize", {"model": MODEL, "content": "naïve 𓀀", "with_pieces": True}),
                       ("/detokenize", {"model": MODEL, "tokens": [2, 9259]}),
                       ("/v1/chat/completions/input_tokens", {"model": MODEL, "messages": CHATS[1]}),
                       ("/detokenize", {"model": MODEL, "tokens": [-1]})):
        raw = json.dumps(body).encode()
        r = requests.post(gemma.url + path, data=raw, timeout=60,
                          headers={"Content-Type": "application/json", "Connection": "close"})
        v = signing.verify_response(pk, request=signing.RequestInfo("POST", path, raw), status=r.status_code,
                                    headers=dict(r.headers), body=r.content, max_age=MAX_AGE)
        assert v is not None and r.status_code in (200, 400)


# ---------------------------------------------------------------------------------------------
# References: llama-cpp-python's tokenizer, and llama-server


_LLAMA_CPP_PYTHON = r"""
import json, sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
out = []
for text in json.loads(sys.stdin.read()):
    row = {}
    for add in (False, True):
        for special in (False, True):
            row[f"{add}-{special}"] = llm.tokenize(text.encode(), add_bos=add, special=special)
    # one token at a time: llama-cpp-python's detokenize drops a space after BOS, which one token has not
    row["pieces"] = [list(llm.detokenize([t], special=True)) for t in row["True-True"]]
    out.append(row)
print(json.dumps(out))
"""


def test_ids_and_pieces_equal_llama_cpp_pythons_tokenizer(gemma, real_model):
    done = subprocess.run([sys.executable, "-c", _LLAMA_CPP_PYTHON, str(real_model)], input=json.dumps(TEXTS),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"reference run failed ({done.returncode}):\n{done.stderr[-3000:]}"
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    for text, ref in zip(TEXTS, theirs, strict=True):
        for add in (False, True):
            for special in (False, True):
                ours = tokenize(gemma, text, add_special=add, parse_special=special)
                assert ours == ref[f"{add}-{special}"], (text, add, special)
        pieces = tokenize(gemma, text, add_special=True, with_pieces=True)
        assert [list(piece_bytes(t["piece"])) for t in pieces] == ref["pieces"], text


@pytest.fixture(scope="module")
def llama_server_url(real_model: Path, tmp_path_factory: pytest.TempPathFactory):
    # The chat template the appliance picks for this GGUF (none inside): llama.cpp's built-in `gemma`.
    # No warm-up decode: tokenizing never computes, so no CPU module's kernels run.
    args = ["--no-warmup", "--no-jinja", "--chat-template", "gemma", "-t", "1", "-c", "1024", "-np", "1"]
    with llama_server(real_model, args, tmp_path_factory.mktemp("llama-server"), timeout=60) as url:
        yield url


def test_the_same_answers_as_llama_server(gemma, llama_server_url):
    def both(path: str, body: dict) -> tuple[object, object]:
        theirs = requests.post(llama_server_url + path, json=body, timeout=60)
        assert theirs.status_code == 200, theirs.text
        return ok(gemma, path, {"model": MODEL, **body}), theirs.json()

    for text in TEXTS:
        for kw in ({}, {"add_special": True}, {"parse_special": False}, {"with_pieces": True},
                   {"with_pieces": True, "add_special": True}):
            ours, theirs = both("/tokenize", {"content": text, **kw})
            assert ours == theirs, (text, kw)
        ids = tokenize(gemma, text, add_special=True)
        ours, theirs = both("/detokenize", {"tokens": ids})
        assert ours == theirs, text
    for messages in CHATS:
        ours, theirs = both("/v1/chat/completions/input_tokens", {"messages": messages})
        assert ours == theirs, messages
