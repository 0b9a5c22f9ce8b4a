"""Real weights: Gemma 3 270M Q4_K_M (the model `make run` serves), through the real server.

Greedy text must equal llama.cpp's own on the same weights and the same CPU build: the reference is
llama-cpp-python's high-level `Llama`, run in a child process (llama.cpp keeps process-wide state),
with the CPU module the server reports in /status loaded, since each x86 build's kernels round
differently and greedy text can differ between builds. Then, on real text: streaming equals
non-streaming, stop strings cut at the stop, logprobs are coherent, and chat is llama.cpp's own `gemma`
template and answer.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from appliance_it import Server, sse_events

pytestmark = pytest.mark.integration

MODEL = "gemma3-270m"
PROMPT = "The capital of France is"
PROMPTS = [PROMPT, "def fibonacci(n):\n", "Once upon a time, in a small village by the sea,"]
N = 24

# llama-cpp-python's own completion API on the same file; greedy (temperature 0 adds llama.cpp's
# greedy sampler; top_k 1 would too). Only the backend loading is ours: the wheel is built with ggml's
# backends as loadable modules, and llama-cpp-python loads none by itself.
_PREAMBLE = r"""
import ctypes, json, pathlib, sys
import llama_cpp
C = llama_cpp.llama_cpp
path, module, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
_ = C._lib
ggml = ctypes.CDLL("libggml.so.0")
ggml.ggml_backend_load.argtypes, ggml.ggml_backend_load.restype = [ctypes.c_char_p], ctypes.c_void_p
if not ggml.ggml_backend_load(str(pathlib.Path(C._base_path) / f"libggml-{module}.so").encode()):
    sys.exit(f"cannot load {module}")
"""
_REFERENCE = _PREAMBLE + r"""
prompts = json.loads(sys.stdin.read())
llm = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
out = [llm.create_completion(p, max_tokens=n, temperature=0.0, top_k=1)["choices"][0]["text"] for p in prompts]
print(json.dumps(out))
"""


def reference(path: Path, module: str, prompts: list[str], n: int) -> list[str]:
    done = subprocess.run([sys.executable, "-c", _REFERENCE, str(path), module, str(n)], input=json.dumps(prompts),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"reference run failed ({done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def gemma(start_server, real_model: Path) -> Server:
    server = start_server(models={MODEL: real_model}, config="[model_defaults]\nn_ctx = 1024\nparallel = 2\n",
                          name="gemma")
    yield server
    server.stop()


def cpu_module(server: Server) -> str:
    r = server.get("/status")
    assert r.status_code == 200, r.text
    return next(d["module"] for d in r.json()["devices"] if d["type"] == "cpu")


def complete(server: Server, prompt: str = PROMPT, **kw) -> dict:
    r = server.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_greedy_text_equals_llama_cpp_on_the_same_weights(gemma, real_model):
    ours = [complete(gemma, p)["choices"][0]["text"] for p in PROMPTS]
    theirs = reference(real_model, cpu_module(gemma), PROMPTS, N)
    assert ours == theirs
    # And it is the real model talking, not noise.
    assert ours[0].startswith(" the capital of"), ours[0]
    assert "France" in ours[0], ours[0]


def test_greedy_is_repeatable(gemma):
    assert complete(gemma)["choices"][0]["text"] == complete(gemma)["choices"][0]["text"]


def test_streaming_equals_non_streaming(gemma):
    for prompt in PROMPTS:
        whole = complete(gemma, prompt)
        r = gemma.post("/v1/completions", stream=True, json={
            "model": MODEL, "prompt": prompt, "max_tokens": N, "temperature": 0, "stream": True,
        })
        assert r.status_code == 200, r.text
        events = list(sse_events(r.iter_lines()))
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [e for e in events[:-1] if e["choices"]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"] == "length"


def test_stop_strings_cut_the_text_at_the_stop(gemma):
    full = complete(gemma)["choices"][0]["text"]
    # A stop at a token boundary, one inside a token ("Fra" of " France"), and one that never occurs.
    for stop in (" largest", "Fra"):
        assert stop in full, (stop, full)
        body = complete(gemma, stop=[stop, "never in this text"])
        choice = body["choices"][0]
        assert choice["text"] == full[: full.index(stop)], (stop, choice["text"], full)
        assert choice["finish_reason"] == "stop"
        # Streamed, the held-back text is released and the stop itself never is.
        r = gemma.post("/v1/completions", stream=True, json={
            "model": MODEL, "prompt": PROMPT, "max_tokens": N, "temperature": 0, "stream": True, "stop": stop,
        })
        chunks = [e for e in sse_events(r.iter_lines()) if e != "[DONE]" and e["choices"]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_logprobs_on_real_text(gemma):
    body = complete(gemma, logprobs=5, max_tokens=12)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    n = body["usage"]["completion_tokens"]
    assert n == 12
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert "".join(lp["tokens"]) == choice["text"]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert math.isfinite(value) and value <= 0.0, (token, value)
        assert 1 <= len(top) <= 5 and all(math.isfinite(v) and v <= 0.0 for v in top.values()), top
        # Greedy: the chosen token is the most likely one, and the alternatives say so.
        assert value == pytest.approx(max(top.values()), abs=1e-5), (token, value, top)
        assert token in top and top[token] == pytest.approx(value, abs=1e-5), (token, top)
    # A real model is confident about at least some of "the capital of the country of France...".
    assert max(lp["token_logprobs"]) > -1.0, lp["token_logprobs"]


_TURN_MARKERS = ("<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>")


_CHAT_REFERENCE = _PREAMBLE + r"""
messages = json.loads(sys.stdin.read())
# llama.cpp's own rendering of its built-in "gemma" template, then its own greedy completion of it.
chat = (C.llama_chat_message * len(messages))(*[C.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in messages])
buf = ctypes.create_string_buffer(8192)
size = C.llama_chat_apply_template(b"gemma", chat, len(messages), True, buf, len(buf))
prompt = buf.raw[:size].decode()
llm = llama_cpp.Llama(model_path=path, n_ctx=512, verbose=False)
out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
print(json.dumps({"prompt": prompt, "text": out["choices"][0]["text"], "prompt_tokens": out["usage"]["prompt_tokens"]}))
"""


def test_chat_uses_gemmas_template_as_llama_cpp_renders_it(gemma, real_model):
    """The GGUF has no chat template: the server must pick llama.cpp's built-in `gemma` one (never ChatML,
    which this model would echo as text). The answer equals llama.cpp's own: its rendering of that
    template, then its greedy completion, on the same weights and CPU build. This checkpoint is the base
    model, not the instruction-tuned one: it does not end its turn (no <end_of_turn>), so the answer
    runs to max_tokens; what it must not do is leak turn markers or answer from another format."""
    status = gemma.status_of(MODEL)
    assert status["chat_template"] == {"source": "builtin", "name": "gemma"}, status
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    r = gemma.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 32, "temperature": 0,
                                                 "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    content = body["choices"][0]["message"]["content"]
    tokens = body["choices"][0]["logprobs"]["content"]
    done = subprocess.run([sys.executable, "-c", _CHAT_REFERENCE, str(real_model), cpu_module(gemma), "32"],
                          input=json.dumps(messages), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"reference run failed ({done.returncode}):\n{done.stderr[-3000:]}"
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    assert theirs["prompt"] == "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    assert body["usage"]["prompt_tokens"] == theirs["prompt_tokens"]
    # Greedy on a base model's off-distribution tail meets near-ties (here after the echoed question),
    # which the two contexts' different KV layouts (our split 2-slot cache against one 512-cell cache)
    # can break either way. So: the same text up to the first difference, which must come after the
    # question, and there llama.cpp's token must be one of our top 5, within 1 nat of the one we took.
    same = len(os.path.commonprefix([content, theirs["text"]]))
    if same < len(content):
        assert same >= len("What is the capital of France?"), (content, theirs["text"])
        at, i = 0, 0
        while at + len(tokens[i]["token"]) <= same:  # the token where the texts part
            at += len(tokens[i]["token"])
            i += 1
        rest = theirs["text"][at:]
        alt = [t for t in tokens[i]["top_logprobs"] if t["token"] and rest.startswith(t["token"])]
        assert alt, f"llama.cpp's next token ({rest[:12]!r}) is not in our top 5: {tokens[i]['top_logprobs']}"
        assert tokens[i]["logprob"] - max(t["logprob"] for t in alt) < 1.0, (tokens[i], alt)
    leaked = [m for m in _TURN_MARKERS if m in content]
    assert not leaked, f"turn markers in the answer: {leaked}: {content!r}"
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
