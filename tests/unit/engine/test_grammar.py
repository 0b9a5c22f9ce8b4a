"""Structured output in the engine: GBNF checks, JSON schema checks and conversion, and constrained
sampling with real llama.cpp on a generated model (random weights: whatever it writes, the grammar
must hold it to the schema)."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pydantic
import pytest
from llama_cpp import llama_grammar

from appliance.engine.errors import InvalidGrammar, InvalidLogitBias, NoAllowedToken
from appliance.engine.events import Delta, Done, Failed, GenerationRequest
from appliance.engine.grammar import (
    JSON_OBJECT_GBNF,
    MAX_NESTING,
    build_grammar,
    check_gbnf,
    check_schema,
    schema_gbnf,
)
from appliance.engine.llama import SamplingParams
from appliance.engine.registry import ModelRegistry
from appliance.settings import Settings
from tools.modelgen import ModelSpec, write_model

# ---------------------------------------------------------------------------------------------
# GBNF syntax (no llama.cpp)


@pytest.mark.parametrize("text", [
    'root ::= "yes" | "no"',
    'root ::= item+\nitem ::= [a-z0-9_-]{1,8} "\\n"',
    'root ::= ( "a" | "b" )*  # a comment\n',
    'root ::= "x" ws\nws ::= [ \\t\\n]*',
    'root ::= (\n  "a"\n  | "b"\n)',
    'root ::= [^"\\\\] "\\x41\\u00e9\\U0001F600" . <[5]> !<[6]> <hello>',
    'root ::= "a"{2} "b"{0,3} "c"{1,}',
    *(getattr(llama_grammar, n) for n in dir(llama_grammar) if n.endswith("_GBNF")),
], ids=lambda v: v[:40])
def test_grammars_llama_cpp_reads_pass(text):
    check_gbnf(text)


@pytest.mark.parametrize("text, says", [
    ("", "empty"),
    ("   \n# only a comment\n", "no 'root' rule"),
    ('item ::= "a"', "no 'root' rule"),
    ("root ::= foo", "rule 'foo' is used but not defined"),
    ('root := "a"', "expecting ::="),
    ('my_rule ::= "a"\nroot ::= my_rule', "expecting ::="),
    ('root ::= "a', "unexpected end of input"),
    ('root ::= [a-', "unexpected end of input"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\x4"', "hex digits"),
    ('root ::= ("a"', "expecting ')'"),
    ('root ::= "a")', "expecting a newline or the end"),
    ("root ::= * \"a\"", "follows nothing"),
    ('root ::= "a"{x}', "expecting an integer"),
    ('root ::= "a"{1,2', "expecting '}'"),
    ('root ::= "a"{3000}', "more than 2000 repetitions"),
    ('root ::= <[5', "expecting ']>'"),
    ('root ::= "a\x00"', "NUL"),
    ("root ::= " + "(" * (MAX_NESTING + 1) + '"a"' + ")" * (MAX_NESTING + 1), f"deeper than {MAX_NESTING}"),
    ('root ::= "a"' + "x" * 300_000, "longer than"),
], ids=lambda v: v[:40] if isinstance(v, str) else None)
def test_broken_grammars_are_refused_with_where_and_why(text, says):
    with pytest.raises(InvalidGrammar) as e:
        check_gbnf(text)
    assert says in e.value.message and e.value.subject == "grammar"
    assert len(e.value.message) < 200  # never the grammar itself


def test_a_refusal_says_the_line_and_column():
    with pytest.raises(InvalidGrammar, match=r"line 2, column 11"):
        check_gbnf('root ::= a\na ::= "x" )')


# ---------------------------------------------------------------------------------------------
# JSON schemas (no llama.cpp)


class Colour(pydantic.BaseModel):
    name: Literal["red", "green", "blue"]
    hex: str = pydantic.Field(pattern=r"^#[0-9a-f]{6}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=20)
    age: int
    nickname: str | None = None
    favourite: Colour
    tags: list[str] = pydantic.Field(max_length=3)
    extra: dict[str, int]


class Tree(pydantic.BaseModel):
    label: str = pydantic.Field(max_length=3)
    children: list[Tree] = pydantic.Field(max_length=2)


SCHEMAS = {
    "person": Person.model_json_schema(),
    "recursive": Tree.model_json_schema(),
    "enum and const": {"type": "object", "properties": {"k": {"enum": ["a", 'q"uote', "back\\slash", 3, None]},
                                                        "c": {"const": {"x": [1, 2]}}}, "required": ["k", "c"]},
    "types": {"type": "array", "items": {"type": ["string", "integer", "null"]}, "minItems": 1, "maxItems": 4},
    "tuple": {"type": "array", "prefixItems": [{"type": "boolean"}, {"type": "number"}]},
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                                 "u": {"type": "string", "format": "uuid"},
                                                 "e": {"type": "string", "format": "email"}}, "required": ["d", "u", "e"]},
    "any value": {},
    "allOf": {"allOf": [{"$ref": "#/$defs/A"}, {"type": "object", "properties": {"b": {"type": "integer"}}}],
              "$defs": {"A": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}}}},
    "no additional": {"type": "object", "additionalProperties": False},
}


@pytest.mark.parametrize("name", SCHEMAS)
def test_supported_schemas_convert_to_grammars_llama_cpp_reads(name):
    gbnf = schema_gbnf(SCHEMAS[name])
    check_gbnf(gbnf)
    assert "root ::=" in gbnf


@pytest.mark.parametrize("schema, says", [
    ([], "must be a JSON object"),
    ("{}", "must be a JSON object"),
    ({"type": "integer", "minimum": 0}, "'minimum' is not supported (at the top level)"),
    ({"type": "object", "properties": {"n": {"type": "number", "multipleOf": 2}}}, "'multipleOf' is not supported (at properties/n)"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "'uniqueItems'"),
    ({"not": {"type": "string"}}, "'not'"),
    ({"type": "object", "properties": {"a": {"type": "string", "nullable": True}}}, "'nullable'"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "'patternProperties'"),
    ({"type": "object", "required": ["x"]}, "'x' must be listed in 'properties'"),
    ({"$ref": "https://example.com/s.json"}, "only local references"),
    ({"$ref": "#/$defs/Missing"}, "does not point into this schema"),
    ({"$ref": "#/$defs/A", "type": "object", "$defs": {"A": {"type": "string"}}}, "'$ref' cannot be combined with 'type'"),
    ({"anyOf": [{"type": "string"}], "maxLength": 3}, "'anyOf' cannot be combined with 'maxLength'"),
    ({"anyOf": []}, "non-empty array"),
    ({"type": ["string", "null"], "maxLength": 3}, "a list of types cannot be combined with 'maxLength'"),
    ({"type": "strnig"}, "'type' must be one of"),
    ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
    ({"type": "string", "pattern": "^(?=a)b$"}, "cannot be converted"),
    ({"type": "string", "maxLength": 5000}, "from 0 to 1000"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "'maxLength' cannot be combined with 'pattern'"),
    ({"maxLength": 3}, "needs 'type': 'string'"),
    ({"type": "array", "minItems": 2}, "only together with 'items'"),
    ({"type": "array", "prefixItems": [{"type": "string"}], "maxItems": 1}, "cannot be combined with a list"),
    ({"type": "array", "items": {"type": "string"}, "prefixItems": [{"type": "string"}]}, "'items' cannot be combined"),
    ({"allOf": [{"type": "string"}]}, "only object schemas with 'properties'"),
    ({"type": "object", "properties": {"": {"type": "string"}}}, "empty property name"),
    ({"type": "object", "properties": {"a": True}}, "a schema must be a JSON object (at properties/a)"),
])
def test_unsupported_schemas_are_refused_naming_the_keyword(schema, says):
    with pytest.raises(InvalidGrammar) as e:
        schema_gbnf(schema)
    assert says in e.value.message and e.value.subject == "schema"


def test_deep_schemas_are_refused():
    schema: dict = {"type": "string"}
    for _ in range(100):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(InvalidGrammar, match="nested deeper than"):
        check_schema(schema)


def test_strings_in_the_converted_grammar_are_json_strings():
    """The converter's own string rule lets raw control characters in (not JSON); ours does not."""
    gbnf = schema_gbnf({"type": "string"})
    char = next(line for line in gbnf.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char


# ---------------------------------------------------------------------------------------------
# With llama.cpp: compile, and generate under the grammar


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    try:
        path = write_model(tmp_path_factory.mktemp("g") / "tiny.gguf", ModelSpec(dtype="q8_0"))
    except FileNotFoundError as e:  # no sdist vocab: this machine cannot build test models
        pytest.fail(f"cannot build the test model: {e}")
    reg = ModelRegistry()
    reg.load(Settings().model_settings("tiny", path, n_ctx=512, parallel=2, max_queue=4, n_threads=2))
    yield reg
    reg.stop_all()


def generate(registry, *, n=200, text="Hello", **sampling):
    engine = registry.get("tiny")
    req = GenerationRequest(tuple(engine.model.tokenize(text)), n, SamplingParams.with_overrides(**sampling))
    out, done = "", None
    for ev in engine.submit(req).events():
        if isinstance(ev, Delta):
            out += ev.text
        elif isinstance(ev, Failed):
            raise ev.error
        elif isinstance(ev, Done):
            done = ev
    return out, done


def test_llama_cpp_compiles_every_supported_schema(registry):
    model = registry.get("tiny").model
    for schema in SCHEMAS.values():
        build_grammar(model, schema=schema).close()
    build_grammar(model, gbnf=JSON_OBJECT_GBNF).close()


def test_left_recursion_is_refused_by_llama_cpp_with_its_reason(registry):
    with pytest.raises(InvalidGrammar, match="left recursion"):
        registry.grammar("tiny", gbnf='root ::= root "a" | "a"')


@pytest.mark.parametrize("seed", range(2))
def test_random_weights_still_write_valid_json_for_the_schema(registry, seed):
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer"},
            "colour": {"enum": ["red", "green", "blue"]},
            "word": {"type": "string", "maxLength": 8},
            "list": {"type": "array", "items": {"type": "number"}, "maxItems": 2},
        },
        "required": ["ok", "n", "colour", "word", "list"],
        "additionalProperties": False,
    }
    text, done = generate(registry, seed=seed, grammar=registry.grammar("tiny", schema=schema), n=300)
    assert done.finish_reason == "stop", (text, done)
    jsonschema.validate(json.loads(text), schema)


def test_greedy_is_constrained_too(registry):
    text, done = generate(registry, temperature=0, grammar=registry.grammar("tiny", gbnf='root ::= "yes" | "no"'))
    assert text in ("yes", "no") and done.finish_reason == "stop"


def test_a_cut_short_output_says_length(registry):
    grammar = registry.grammar("tiny", gbnf='root ::= "x"{50}')
    text, done = generate(registry, temperature=0, grammar=grammar, n=5)
    assert done.finish_reason == "length" and set(text) <= {"x"}


def test_a_grammar_the_vocabulary_cannot_follow_fails_the_request_not_the_engine(registry):
    engine = registry.get("tiny")
    bos = engine.model.bos  # a control token: no text, so constrained sampling never picks it
    with pytest.raises(NoAllowedToken):
        generate(registry, grammar=registry.grammar("tiny", gbnf=f"root ::= <[{bos}]>"))
    text, done = generate(registry, n=4)  # the engine serves on
    assert done.finish_reason == "length" and engine.healthy


def test_logit_bias_moves_greedy_off_its_choice(registry):
    engine = registry.get("tiny")
    plain, _ = generate(registry, temperature=0, n=4)
    first = engine.model.tokenize(plain, add_special=False)[0]
    biased, _ = generate(registry, temperature=0, n=4, logit_bias=((first, -100.0),))
    assert biased != plain
    assert engine.model.tokenize(biased, add_special=False)[0] != first
    forced, _ = generate(registry, temperature=0, n=1, logit_bias=((first, 100.0),), text="Another prompt")
    assert engine.model.tokenize(forced, add_special=False)[0] == first


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(registry):
    engine = registry.get("tiny")
    req = GenerationRequest((1, 2), 4, SamplingParams(logit_bias=((engine.model.n_vocab, 1.0),)))
    with pytest.raises(InvalidLogitBias, match="not in this model's vocabulary"):
        engine.submit(req)


def test_ignore_eos_past_a_complete_grammar_runs_to_the_limit_without_breaking_it(registry):
    engine = registry.get("tiny")
    grammar = registry.grammar("tiny", gbnf='root ::= "ok"')
    req = GenerationRequest(tuple(engine.model.tokenize("Hi")), 6, SamplingParams(temperature=0, grammar=grammar),
                            ignore_eos=True)
    text = "".join(ev.text for ev in engine.submit(req).events() if isinstance(ev, Delta))
    assert text == "ok" and engine.healthy  # end-of-generation tokens add no text
