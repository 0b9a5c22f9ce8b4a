"""Which chat template a model gets, and the prompt bytes each kind renders.

Detection is tested as a pure function of (architecture, special tokens, pre-tokenizer), then on
generated GGUFs with real vocabularies loaded by llama.cpp; built-in templates are rendered by
llama.cpp itself, so the expected strings below are what its `llama_chat_apply_template` produces.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from appliance.engine.chat import (
    _BY_VOCABULARY,
    ChatTemplate,
    _is_special_token,
    builtin_templates,
    detect_builtin,
    model_chat_template,
    render_chat,
)
from appliance.engine.errors import InvalidPrompt, NoChatTemplate
from appliance.web.errors import from_engine

GEMMA_MARKERS = {"<start_of_turn>", "<end_of_turn>"}
LLAMA3_MARKERS = {"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
CHATML_MARKERS = {"<|im_start|>", "<|im_end|>"}


def detect(architecture, specials, pre=None, available=None):
    return detect_builtin(
        architecture=architecture, has_special=set(specials).__contains__, tokenizer_pre=pre, available=available
    )


def render(template, messages):
    return render_chat(template, messages, model_name="m", bos_token="<s>", eos_token="</s>")


# -- detection from architecture and vocabulary ------------------------------------------------------


@pytest.mark.parametrize(
    ("architecture", "specials", "pre", "expected"),
    [
        ("gemma3", GEMMA_MARKERS | {"<bos>", "<eos>"}, "default", "gemma"),
        ("gemma", GEMMA_MARKERS, None, "gemma"),
        ("gemma2", GEMMA_MARKERS, None, "gemma"),
        ("gemma3n", GEMMA_MARKERS, None, "gemma"),
        ("llama", LLAMA3_MARKERS | {"<|begin_of_text|>"}, "llama-bpe", "llama3"),
        ("qwen2", CHATML_MARKERS | {"<|endoftext|>"}, "qwen2", "chatml"),
        ("llama", CHATML_MARKERS, None, "chatml"),  # a fine-tune that added ChatML's tokens
        ("phi3", {"<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"}, None, "phi3"),
        ("phi3", CHATML_MARKERS | {"<|im_sep|>"}, None, "phi4"),
        ("llama", {"[INST]", "[/INST]"}, None, "mistral-v3"),
        ("llama", {"[INST]", "[/INST]"}, "tekken", "mistral-v3-tekken"),
        ("llama", {"[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"}, "tekken", "mistral-v7-tekken"),
        ("llama", {"[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"}, None, "mistral-v7"),
        ("command-r", {"<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>"}, None, "command-r"),
    ],
)
def test_detects_the_builtin_template_from_the_vocabulary(architecture, specials, pre, expected):
    assert detect(architecture, specials, pre) == expected


@pytest.mark.parametrize(
    ("architecture", "specials"),
    [
        ("gemma3", {"<bos>", "<eos>"}),  # a Gemma file whose vocabulary lacks the turn markers
        ("llama", {"<s>", "</s>"}),  # Llama 2 / Mistral v0.1: [INST] is plain text there
        ("gpt2", {"<|endoftext|>"}),
        ("llama", {"<|im_start|>"}),  # half of ChatML is not ChatML
        ("llama", {"<start_of_turn>"}),
        ("phi3", {"<|user|>", "<|assistant|>"}),
    ],
)
def test_nothing_fits_without_every_marker(architecture, specials):
    assert detect(architecture, specials) is None


def test_the_architectures_own_template_comes_first():
    both = LLAMA3_MARKERS | CHATML_MARKERS
    assert detect("qwen2", both) == "chatml"
    assert detect("llama", both) == "llama3"
    assert detect("some-new-arch", both) == "llama3"  # no preference: the table's order
    assert detect("qwen2", GEMMA_MARKERS | CHATML_MARKERS) == "chatml"
    assert detect("gemma3", GEMMA_MARKERS | CHATML_MARKERS) == "gemma"


def test_only_templates_this_llama_cpp_has_are_chosen():
    assert detect("gemma3", GEMMA_MARKERS | CHATML_MARKERS, available={"chatml"}) == "chatml"
    assert detect("gemma3", GEMMA_MARKERS, available={"chatml"}) is None


def test_every_template_in_the_table_is_one_of_llama_cpps_builtins():
    names = builtin_templates()
    assert {"gemma", "llama3", "chatml", "phi3", "mistral-v7"} <= names
    for name, _, _ in _BY_VOCABULARY:
        assert name in names
        if name.startswith("mistral-"):
            assert f"{name}-tekken" in names


# -- rendering ---------------------------------------------------------------------------------------

GEMMA = ChatTemplate("builtin", name="gemma")


def test_gemma_prompt_as_llama_cpp_renders_it():
    assert render(GEMMA, [{"role": "user", "content": "Hi"}]) == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    turns = [
        {"role": "user", "content": " Hi "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "How are you?\n"},
    ]
    assert render(GEMMA, turns) == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_gemma_merges_the_system_prompt_into_the_next_user_turn():
    # Gemma has no system role: llama.cpp prepends the (trimmed) system text to the first user turn.
    messages = [{"role": "system", "content": " Be terse. "}, {"role": "user", "content": "Hi"}]
    assert render(GEMMA, messages) == "<start_of_turn>user\nBe terse.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    developer = [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert render(GEMMA, developer) == render(GEMMA, messages)  # OpenAI's newer name for the system role


def test_builtin_chatml_and_llama3_bytes():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    assert render(ChatTemplate("builtin", name="chatml"), messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(ChatTemplate("builtin", name="llama3"), messages) == (
        "<|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_a_prompt_longer_than_the_first_buffer_is_rendered_whole():
    messages = [{"role": "user", "content": ""}] * 60 + [{"role": "user", "content": "é" * 3000}]
    text = render(GEMMA, messages)
    assert text == "<start_of_turn>user\n<end_of_turn>\n" * 60 + f"<start_of_turn>user\n{'é' * 3000}<end_of_turn>\n<start_of_turn>model\n"


def test_a_nul_character_is_a_400_not_a_truncated_prompt():
    with pytest.raises(InvalidPrompt) as e:
        render(GEMMA, [{"role": "user", "content": "visible\0hidden"}])
    assert from_engine(e.value, prompt_param="messages").param == "messages"


def test_no_template_is_a_400_naming_the_setting():
    with pytest.raises(NoChatTemplate) as raised:
        render(None, [{"role": "user", "content": "Hi"}])
    wire = from_engine(raised.value, prompt_param="messages")
    err = wire.body()["error"]
    assert wire.status == 400 and err["type"] == "invalid_request_error"
    assert err["code"] == "no_chat_template" and err["param"] == "model"
    assert "'m'" in err["message"] and "chat_template" in err["message"]


def test_jinja_templates_still_render_in_the_sandbox():
    t = ChatTemplate("gguf", jinja="{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert render(t, [{"role": "user", "content": "Hi"}]) == "<s>[user]Hi"
    with pytest.raises(InvalidPrompt):
        render(ChatTemplate("config", jinja="{{ raise_exception('no') }}"), [{"role": "user", "content": "Hi"}])


def test_the_setting_is_a_builtin_name_or_jinja():
    assert ChatTemplate.configured("gemma") == ChatTemplate("config", name="gemma")
    assert ChatTemplate.configured(" llama3\n") == ChatTemplate("config", name="llama3")
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ChatTemplate.configured(jinja) == ChatTemplate("config", jinja=jinja)
    assert ChatTemplate.configured("gemma").status() == {"source": "config", "name": "gemma"}
    assert ChatTemplate("gguf", jinja=jinja).status() == {"source": "gguf", "name": None}


# -- real GGUFs loaded by llama.cpp ------------------------------------------------------------------


def _model(tmp_path_factory, vocab: str, template: str | None):
    from appliance.engine.llama import LlamaModel
    from tools.modelgen import ModelSpec, write_model

    spec = ModelSpec(vocab=vocab, chat_template=template, n_layer=1)
    try:
        path = write_model(tmp_path_factory.mktemp("chat") / "m.gguf", spec)
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
    return LlamaModel(path)


@pytest.fixture(scope="module")
def llama3_untemplated(tmp_path_factory):
    model = _model(tmp_path_factory, "ggml-vocab-llama-bpe.gguf", None)
    yield model
    model.close()


@pytest.mark.parametrize(
    ("vocab", "expected"),
    [
        ("ggml-vocab-qwen2.gguf", {"source": "builtin", "name": "chatml"}),
        ("ggml-vocab-phi-3.gguf", {"source": "builtin", "name": "phi3"}),
        # This vocabulary file carries Cohere's `tool_use` template, which llama.cpp's server takes
        # when the default one is missing (and its markers would give the built-in `command-r`).
        ("ggml-vocab-command-r.gguf", {"source": "gguf", "name": None}),
        ("ggml-vocab-gpt-2.gguf", None),
        ("ggml-vocab-llama-spm.gguf", None),
    ],
)
def test_untemplated_gguf_gets_the_builtin_its_vocabulary_fits(tmp_path_factory, vocab, expected):
    model = _model(tmp_path_factory, vocab, None)
    try:
        assert model.meta("tokenizer.chat_template") is None
        template = model_chat_template(model, None)
        assert (template.status() if template else None) == expected
        if vocab == "ggml-vocab-command-r.gguf":
            markers = ("<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|END_OF_TURN_TOKEN|>")
            assert all(_is_special_token(model, m) for m in markers)
            assert not _is_special_token(model, "<start_of_turn>") and not _is_special_token(model, "Hello")
    finally:
        model.close()


def test_untemplated_llama3_gguf_and_the_override(llama3_untemplated):
    assert model_chat_template(llama3_untemplated, None) == ChatTemplate("builtin", name="llama3")
    assert model_chat_template(llama3_untemplated, "gemma") == ChatTemplate("config", name="gemma")
    jinja = "{{ messages[0]['content'] }}"
    assert model_chat_template(llama3_untemplated, jinja) == ChatTemplate("config", jinja=jinja)


def test_a_gguf_template_is_kept_as_jinja_unless_the_setting_overrides_it(tmp_path_factory):
    model = _model(tmp_path_factory, "ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.2-3B-Instruct.jinja")
    try:
        t = model_chat_template(model, None)
        assert t.source == "gguf" and t.name is None and "<|start_header_id|>" in t.jinja
        assert model_chat_template(model, "chatml") == ChatTemplate("config", name="chatml")
    finally:
        model.close()


class _MetaOnly:
    def __init__(self, **meta):
        self._meta = meta

    def meta(self, key):
        return self._meta.get(key)


def test_a_gguf_with_only_a_tool_use_template_uses_it_as_llama_cpp_does():
    model = _MetaOnly(**{"general.architecture": "llama", "tokenizer.chat_template.tool_use": "{{ 'T' }}"})
    assert model_chat_template(model, None) == ChatTemplate("gguf", jinja="{{ 'T' }}")
    both = _MetaOnly(**{"tokenizer.chat_template": "{{ 'D' }}", "tokenizer.chat_template.tool_use": "{{ 'T' }}"})
    assert model_chat_template(both, None) == ChatTemplate("gguf", jinja="{{ 'D' }}")


def test_metadata_without_an_architecture_gets_no_guess():
    assert model_chat_template(_MetaOnly(), None) is None


def test_the_builtin_prompt_tokenizes_into_the_vocabularys_markers(llama3_untemplated):
    model = llama3_untemplated
    text = render(model_chat_template(model, None), [{"role": "user", "content": "Hi"}])
    tokens = model.tokenize(text, add_special=True, parse_special=True)
    specials = [model.token_text(t) for t in tokens if model.token_text(t).startswith("<|")]
    assert specials == ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                        "<|start_header_id|>", "<|end_header_id|>"]


def test_registry_logs_the_template_once_and_status_shows_its_source(llama3_untemplated, caplog):
    from appliance.engine.registry import ModelRegistry
    from appliance.settings import Settings

    reg = ModelRegistry()
    settings = Settings().model_settings("plain", llama3_untemplated.path, n_ctx=128, parallel=1, n_threads=1)
    with caplog.at_level(logging.INFO, logger="appliance.models"):
        rec = reg.load(settings)
    try:
        assert rec.status()["chat_template"] == {"source": "builtin", "name": "llama3"}
        lines = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
        assert lines == ["model plain chat template: llama.cpp's built-in 'llama3' template, chosen for this model"]
    finally:
        reg.stop_all()


GEMMA_GGUF = Path(os.environ.get("APPLIANCE_GEMMA_GGUF", "~/.cache/appliance/models/gemma-3-270m-q4_k_m.gguf")).expanduser()


@pytest.mark.skipif(not GEMMA_GGUF.is_file(), reason=f"no Gemma 3 GGUF at {GEMMA_GGUF}")
def test_real_gemma3_gets_llama_cpps_gemma_template():
    from appliance.engine.llama import LlamaModel

    model = LlamaModel(GEMMA_GGUF)
    try:
        assert model.meta("tokenizer.chat_template") is None and model.meta("general.architecture") == "gemma3"
        template = model_chat_template(model, None)
        assert template == ChatTemplate("builtin", name="gemma")
        text = render(template, [{"role": "user", "content": "Hi"}])
        tokens = model.tokenize(text, add_special=True, parse_special=True)
        assert [model.token_text(t) for t in tokens[:3]] == ["<bos>", "<start_of_turn>", "user"]
        assert model.token_text(tokens[-3]) == "<start_of_turn>"
    finally:
        model.close()
