"""Structured output: GBNF grammars and JSON schemas, checked and compiled for one model.

A request's grammar comes three ways: GBNF text as given (llama-server's `grammar`), a JSON schema
(OpenAI's `response_format` json_schema, llama-server's `json_schema`), compiled to GBNF by
llama-cpp-python's port of llama.cpp's converter, or "any JSON object" (`json_object`), llama.cpp's
generic JSON grammar. Whichever it is, llama.cpp compiles it (`llama.Grammar`) and a grammar
sampler constrains every token the sequence samples.

Two guards sit in front of llama.cpp:
  * GBNF text is checked here first (`check_gbnf`, the same syntax as llama.cpp's parser): its
    parser recurses once per nested group (about 30,000 nested parentheses overflow a thread's
    stack and kill the worker) and prints the whole grammar to stderr when it cannot parse one.
  * A JSON schema is checked for what the converter would silently drop (`check_schema`): a
    keyword it ignores (`minimum`, `uniqueItems`, `not`, ...) would let through output the
    schema forbids, so any such keyword is refused, by name.
All of this is CPU work proportional to the input: call `build_grammar` off the event loop.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

from llama_cpp import llama_grammar

from appliance.engine.errors import InvalidGrammar
from appliance.engine.llama import Grammar, LlamaModel

__all__ = [
    "JSON_OBJECT_GBNF",
    "MAX_GRAMMAR_CHARS",
    "MAX_NESTING",
    "MAX_RULES",
    "MAX_SCHEMA_DEPTH",
    "MAX_REPEAT",
    "check_gbnf",
    "check_schema",
    "schema_gbnf",
    "build_grammar",
    "ToolSpec",
    "tool_calls_schema",
]

MAX_GRAMMAR_CHARS: Final = 256 * 1024
"""The longest GBNF grammar accepted, given or compiled from a schema."""
MAX_NESTING: Final = 2000
"""The deepest nesting of groups, `(` ... `)`, in a grammar (llama.cpp's parser recurses per level)."""
MAX_RULES: Final = 10_000
"""The most named rules in a grammar."""
MAX_SCHEMA_DEPTH: Final = 64
"""The deepest nesting of subschemas in a JSON schema."""
MAX_REPEAT: Final = 1000
"""The largest minLength / maxLength / minItems / maxItems: the converter spells each bound out as
that many nested optional items."""

JSON_OBJECT_GBNF: Final[str] = llama_grammar.JSON_GBNF
"""Any JSON object (llama.cpp's grammars/json.gbnf)."""


# ---------------------------------------------------------------------------------------------
# GBNF syntax, as llama.cpp's parser (src/llama-grammar.cpp) reads it


def check_gbnf(text: str) -> None:
    """InvalidGrammar unless `text` is a GBNF grammar llama.cpp's parser would read, with a `root`
    rule, every rule it uses defined, and within the size limits above.

    What only llama.cpp can judge is left to it: left recursion, whether a `<token>` is one token
    of the vocabulary, the repetition limits of `{m,n}`."""
    _GbnfChecker(text).check()


_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789abcdefABCDEF")
_DIGITS = frozenset("0123456789")
_SIMPLE_ESCAPES = frozenset('trn\\"[]-')
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_MAX_REPETITIONS = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD for {m,n}


class _GbnfChecker:
    """One pass over a grammar, iterative (so its own nesting costs no Python stack)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        self.defined: set[str] = set()
        self.used: dict[str, int] = {}  # rule name -> where first used

    def fail(self, what: str, pos: int) -> InvalidGrammar:
        line = self.text.count("\n", 0, pos) + 1
        col = pos - (self.text.rfind("\n", 0, pos) + 1) + 1
        return InvalidGrammar(f"{what} (line {line}, column {col})", subject="grammar")

    def at(self, pos: int) -> str:
        return self.text[pos] if pos < self.n else ""

    def check(self) -> None:
        if not self.text.strip():
            raise InvalidGrammar("the grammar is empty", subject="grammar")
        if len(self.text) > MAX_GRAMMAR_CHARS:
            raise InvalidGrammar(f"the grammar is longer than {MAX_GRAMMAR_CHARS} characters", subject="grammar")
        if "\x00" in self.text:
            raise self.fail("NUL character", self.text.index("\x00"))
        pos = self.space(0, newline_ok=True)
        while pos < self.n:
            pos = self.rule(pos)
        for name, where in self.used.items():
            if name not in self.defined:
                raise self.fail(f"rule '{name}' is used but not defined", where)
        if "root" not in self.defined:
            raise InvalidGrammar("the grammar has no 'root' rule (generation starts there)", subject="grammar")

    def space(self, pos: int, *, newline_ok: bool) -> int:
        text, n = self.text, self.n
        while pos < n:
            c = text[pos]
            if c == "#":
                while pos < n and text[pos] not in "\r\n":
                    pos += 1
            elif c in " \t" or (newline_ok and c in "\r\n"):
                pos += 1
            else:
                break
        return pos

    def name(self, pos: int) -> int:
        end = pos
        while end < self.n and self.text[end] in _WORD:
            end += 1
        if end == pos:
            raise self.fail("expecting a rule name", pos)
        return end

    def char(self, pos: int) -> int:
        """One (possibly escaped) character of a literal or a character class."""
        c = self.at(pos)
        if c == "":
            raise self.fail("unexpected end of input", pos)
        if c != "\\":
            return pos + 1
        e = self.at(pos + 1)
        if e in _HEX_ESCAPES:
            digits = self.text[pos + 2 : pos + 2 + _HEX_ESCAPES[e]]
            if len(digits) != _HEX_ESCAPES[e] or not set(digits) <= _HEX:
                raise self.fail(f"expecting {_HEX_ESCAPES[e]} hex digits after \\{e}", pos)
            return pos + 2 + _HEX_ESCAPES[e]
        if e != "" and e in _SIMPLE_ESCAPES:
            return pos + 2
        raise self.fail("unknown escape", pos)

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while end < self.n and self.text[end] in _DIGITS:
            end += 1
        if end == pos:
            raise self.fail("expecting an integer", pos)
        return int(self.text[pos:end]), end

    def rule(self, pos: int) -> int:
        start = pos
        end = self.name(pos)
        if len(self.defined) >= MAX_RULES:
            raise self.fail(f"more than {MAX_RULES} rules", start)
        self.defined.add(self.text[start:end])
        pos = self.space(end, newline_ok=False)
        if self.text[pos : pos + 3] != "::=":
            raise self.fail("expecting ::=", pos)
        pos = self.alternates(self.space(pos + 3, newline_ok=True))
        c = self.at(pos)
        if c == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c != "":
            raise self.fail("expecting a newline or the end after a rule", pos)
        return self.space(pos, newline_ok=True)

    def alternates(self, pos: int) -> int:
        """A rule's body: sequences separated by `|`, with nested groups; returns where it ends."""
        text = self.text
        depth = 0
        have_item = False  # something a repetition operator can apply to
        while True:
            nested = depth > 0
            c = self.at(pos)
            if c == '"':
                pos += 1
                while self.at(pos) != '"':
                    pos = self.char(pos)
                pos, have_item = self.space(pos + 1, newline_ok=nested), True
            elif c == "[":
                pos += 1
                if self.at(pos) == "^":
                    pos += 1
                while self.at(pos) != "]":
                    pos = self.char(pos)
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        if self.at(pos + 1) == "":
                            raise self.fail("unexpected end of input", pos + 1)
                        pos = self.char(pos + 1)
                pos, have_item = self.space(pos + 1, newline_ok=nested), True
            elif c in ("<", "!"):
                pos, have_item = self.space(self.token(pos), newline_ok=nested), True
            elif c != "" and c in _WORD:
                end = self.name(pos)
                self.used.setdefault(text[pos:end], pos)
                pos, have_item = self.space(end, newline_ok=nested), True
            elif c == "(":
                depth += 1
                if depth > MAX_NESTING:
                    raise self.fail(f"groups nested deeper than {MAX_NESTING}", pos)
                pos, have_item = self.space(pos + 1, newline_ok=True), False
            elif c == ")" and nested:
                depth -= 1
                pos, have_item = self.space(pos + 1, newline_ok=depth > 0), True
            elif c == ".":
                pos, have_item = self.space(pos + 1, newline_ok=nested), True
            elif c in ("*", "+", "?"):
                if not have_item:
                    raise self.fail(f"'{c}' follows nothing it could repeat", pos)
                pos = self.space(pos + 1, newline_ok=nested)
            elif c == "{":
                if not have_item:
                    raise self.fail("'{' follows nothing it could repeat", pos)
                pos = self.repetition(pos, nested)
            elif c == "|":
                pos, have_item = self.space(pos + 1, newline_ok=True), False
            else:
                if nested:
                    raise self.fail("expecting ')'", pos)
                return pos

    def token(self, pos: int) -> int:
        if self.at(pos) == "!":
            pos += 1
        if self.at(pos) != "<":
            raise self.fail("expecting '<'", pos)
        pos += 1
        if self.at(pos) == "[":
            _, pos = self.integer(pos + 1)
            if self.text[pos : pos + 2] != "]>":
                raise self.fail("expecting ']>'", pos)
            return pos + 2
        end = self.text.find(">", pos)
        if end < 0:
            raise self.fail("expecting '>'", self.n)
        return end + 1

    def repetition(self, pos: int, nested: bool) -> int:
        start = pos
        pos = self.space(pos + 1, newline_ok=nested)
        low, pos = self.integer(pos)
        pos = self.space(pos, newline_ok=nested)
        if self.at(pos) == ",":
            pos = self.space(pos + 1, newline_ok=nested)
            if self.at(pos) in _DIGITS and self.at(pos) != "":
                _, pos = self.integer(pos)
                pos = self.space(pos, newline_ok=nested)
            if self.at(pos) != "}":
                raise self.fail("expecting '}'", pos)
        elif self.at(pos) != "}":
            raise self.fail("expecting ',' or '}'", pos)
        if low > _MAX_REPETITIONS:
            raise self.fail(f"more than {_MAX_REPETITIONS} repetitions", start)
        return self.space(pos + 1, newline_ok=nested)


# ---------------------------------------------------------------------------------------------
# JSON schemas


_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
    "writeOnly", "discriminator", "$defs", "definitions",
})
_KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
    "properties", "required", "additionalProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "pattern", "format", "minLength", "maxLength",
})
_FORMATS_WITH_RULES = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})
_ANY_VALUE: Final[dict[str, Any]] = {"anyOf": [{"type": t} for t in ("object", "array", "string", "number", "boolean", "null")]}


def check_schema(schema: object) -> None:
    """InvalidGrammar (naming the keyword and where it is) unless every keyword of `schema` is one the
    converter enforces, in a combination it enforces, or an annotation that constrains nothing.

    Supported: type (one or a list), enum, const, anyOf, oneOf (as anyOf: not exclusive), allOf
    (of object schemas, merged), local $ref (`#/...`, recursion included), properties, required,
    additionalProperties, items, prefixItems, minItems, maxItems, pattern (anchored `^...$`),
    minLength, maxLength, format (date, time, date-time and uuid are enforced; others are
    annotations, as JSON Schema has it)."""
    if not isinstance(schema, Mapping):
        raise InvalidGrammar("the schema must be a JSON object", subject="schema")
    _SchemaChecker(schema).visit(schema, "", 0)


class _SchemaChecker:
    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root

    @staticmethod
    def fail(path: str, what: str) -> InvalidGrammar:
        return InvalidGrammar(f"{what} (at {path or 'the top level'})", subject="schema")

    def resolve(self, ref: object, path: str) -> Mapping[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.fail(path, "'$ref': only local references ('#/...') are supported")
        node: Any = self.root
        for part in ref[2:].split("/"):
            if not isinstance(node, Mapping) or part not in node:
                raise self.fail(path, f"'$ref': {ref} does not point into this schema")
            node = node[part]
        if not isinstance(node, Mapping):
            raise self.fail(path, f"'$ref': {ref} is not a schema object")
        return node

    def visit(self, node: object, path: str, depth: int) -> None:
        if not isinstance(node, Mapping):
            raise self.fail(path, "a schema must be a JSON object")
        if depth > MAX_SCHEMA_DEPTH:
            raise self.fail(path, f"subschemas nested deeper than {MAX_SCHEMA_DEPTH}")
        for key in node:
            if key not in _KEYWORDS and key not in _ANNOTATIONS:
                raise self.fail(path, f"the keyword '{key}' is not supported")

        def sub(child: object, where: str) -> None:
            self.visit(child, f"{path}/{where}" if path else where, depth + 1)

        constraining = [k for k in node if k in _KEYWORDS]
        for defs in ("$defs", "definitions"):
            if defs in node:
                if not isinstance(node[defs], Mapping):
                    raise self.fail(path, f"'{defs}' must be an object")
                for name, child in node[defs].items():
                    sub(child, f"{defs}/{name}")

        # The converter takes the first of these that a schema has and ignores everything else
        # that constrains: so each may only stand with annotations.
        for lead in ("$ref", "anyOf", "oneOf"):
            if lead in node:
                others = [k for k in constraining if k != lead]
                if others:
                    raise self.fail(path, f"'{lead}' cannot be combined with '{others[0]}' here")
        if "$ref" in node:
            self.resolve(node["$ref"], path)
            return
        for union in ("anyOf", "oneOf"):
            if union in node:
                branches = node[union]
                if not isinstance(branches, list) or not branches:
                    raise self.fail(path, f"'{union}' must be a non-empty array of schemas")
                for i, child in enumerate(branches):
                    sub(child, f"{union}/{i}")
                return

        kind = node.get("type")
        if isinstance(kind, list):
            if not kind or any(not isinstance(t, str) or t not in _TYPES for t in kind) or len(set(kind)) != len(kind):
                raise self.fail(path, "'type' must name JSON types: string, number, integer, boolean, object, array, null")
            others = [k for k in constraining if k != "type"]
            if others:
                raise self.fail(path, f"a list of types cannot be combined with '{others[0]}'")
            return
        if kind is not None and (not isinstance(kind, str) or kind not in _TYPES):
            raise self.fail(path, "'type' must be one of string, number, integer, boolean, object, array, null")
        if "const" in node:
            return
        if "enum" in node:
            if not isinstance(node["enum"], list) or not node["enum"]:
                raise self.fail(path, "'enum' must be a non-empty array")
            return

        if "allOf" in node:
            self.all_of(node, path, constraining, sub)
            return
        self.object_keywords(node, path, sub)
        self.array_keywords(node, path, sub)
        self.string_keywords(node, path)

    def all_of(self, node: Mapping[str, Any], path: str, constraining: list[str], sub: Any) -> None:
        # The converter merges the properties of each part (all required, nothing else allowed).
        others = [k for k in constraining if k not in ("allOf", "type")]
        if others or node.get("type") not in (None, "object"):
            raise self.fail(path, f"'allOf' cannot be combined with '{(others or ['type'])[0]}' here")
        parts = node["allOf"]
        if not isinstance(parts, list) or not parts:
            raise self.fail(path, "'allOf' must be a non-empty array of schemas")
        for i, part in enumerate(parts):
            sub(part, f"allOf/{i}")
            options = part["anyOf"] if isinstance(part, Mapping) and "anyOf" in part else [part]
            for option in options:
                target = self.resolve(option["$ref"], path) if isinstance(option, Mapping) and "$ref" in option else option
                if not isinstance(target, Mapping) or "properties" not in target:
                    raise self.fail(path, "'allOf': only object schemas with 'properties' can be merged")

    def object_keywords(self, node: Mapping[str, Any], path: str, sub: Any) -> None:
        props = node.get("properties", {})
        if not isinstance(props, Mapping):
            raise self.fail(path, "'properties' must be an object")
        for name, child in props.items():
            if name == "":
                raise self.fail(path, "'properties': an empty property name is not supported")
            sub(child, f"properties/{name}")
        required = node.get("required", [])
        if not isinstance(required, list) or any(not isinstance(r, str) for r in required):
            raise self.fail(path, "'required' must be an array of property names")
        for name in required:
            if name not in props:
                raise self.fail(path, f"'required': '{name}' must be listed in 'properties'")
        extra = node.get("additionalProperties")
        if extra is not None and not isinstance(extra, bool):
            sub(extra, "additionalProperties")

    def array_keywords(self, node: Mapping[str, Any], path: str, sub: Any) -> None:
        items, prefix = node.get("items"), node.get("prefixItems")
        if items is not None and prefix is not None:
            raise self.fail(path, "'items' cannot be combined with 'prefixItems'")
        tuple_form = isinstance(items, list) or prefix is not None
        for key in ("minItems", "maxItems"):
            if key in node:
                self.bound(node, key, path)
                if items is None and prefix is None:
                    raise self.fail(path, f"'{key}' is supported only together with 'items'")
                if tuple_form:
                    raise self.fail(path, f"'{key}' cannot be combined with a list of item schemas")
        for where, value in (("items", items), ("prefixItems", prefix)):
            if isinstance(value, list):
                if not value:
                    raise self.fail(path, f"'{where}' must not be empty")
                for i, child in enumerate(value):
                    sub(child, f"{where}/{i}")
            elif value is not None:
                if where == "prefixItems":
                    raise self.fail(path, "'prefixItems' must be an array of schemas")
                sub(value, where)

    def string_keywords(self, node: Mapping[str, Any], path: str) -> None:
        pattern, fmt = node.get("pattern"), node.get("format")
        if pattern is not None and (not isinstance(pattern, str) or not pattern.startswith("^") or not pattern.endswith("$")):
            raise self.fail(path, "'pattern' must be a string anchored at both ends ('^...$')")
        if fmt is not None and not isinstance(fmt, str):
            raise self.fail(path, "'format' must be a string")
        for key in ("minLength", "maxLength"):
            if key in node:
                self.bound(node, key, path)
                if node.get("type") != "string":
                    raise self.fail(path, f"'{key}' needs 'type': 'string'")
                if pattern is not None or fmt in _FORMATS_WITH_RULES:
                    raise self.fail(path, f"'{key}' cannot be combined with '{'pattern' if pattern is not None else 'format'}'")

    def bound(self, node: Mapping[str, Any], key: str, path: str) -> None:
        value = node[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_REPEAT:
            raise self.fail(path, f"'{key}' must be an integer from 0 to {MAX_REPEAT}")


class _Converter(llama_grammar.SchemaConverter):
    """llama-cpp-python's port of llama.cpp's converter, with four fixes its upstream has since made
    or that JSON needs: literals escape backslashes (a quote or backslash inside an enum value or a
    property name broke the grammar), a string character excludes control characters (raw newlines
    are not JSON), `.` in a pattern stays inside a JSON string (no raw quote or backslash), and the
    whitespace between tokens is llama.cpp's own (common/json-schema-to-grammar.cpp `SPACE_RULE`:
    nothing, a space, or one or two newlines and an indent), not the port's older single optional
    space, so a model may lay its JSON out as it would under llama-server, and greedy answers are
    llama-server's (tests/integration/test_structured_output.py)."""

    _SPACE_RULE: Final = '| " " | "\\n"{1,2} [ \\t]{0,20}'

    def __init__(self, **kw: Any) -> None:
        cast(Any, super()).__init__(**kw)  # (the converter is untyped upstream)
        self._rules["space"] = self._SPACE_RULE

    _LITERAL_ESCAPES: Final = {"\r": "\\r", "\n": "\\n", '"': '\\"', "\\": "\\\\"}
    _JSON_CHAR: Final = llama_grammar.BuiltinRule(
        r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])', [])

    def _format_literal(self, literal: str) -> str:
        escaped = re.sub(r'[\r\n"\\]', lambda m: self._LITERAL_ESCAPES[m.group(0)], literal)
        return f'"{escaped}"'

    def _add_primitive(self, name: str, rule: Any) -> str:
        n: str = cast(Any, super())._add_primitive(name, self._JSON_CHAR if name == "char" else rule)
        return n

    def _add_rule(self, name: str, rule: str) -> str:
        if name == "dot":
            rule = r'[^"\\\x7F\x00-\x1F]'
        key: str = cast(Any, super())._add_rule(name, rule)
        return key


def _prepared(node: Any) -> Any:
    """A checked schema, rewritten where the converter would misread it as written:
      * an empty subschema `{}` (any value) is spelt out as a union (it would read "an object");
      * a `$ref` beside `$defs` (pydantic's recursive models at the top level) becomes a one-branch
        `anyOf`: the converter never looks past a `$ref` for definitions to resolve."""
    if isinstance(node, list):
        return [_prepared(x) for x in node]
    if not isinstance(node, dict):
        return node
    if not node:
        return copy.deepcopy(_ANY_VALUE)
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in ("enum", "const", "default", "examples"):
            out[k] = v  # values, not schemas
        elif k in ("properties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: _prepared(child) for name, child in v.items()}
        else:
            out[k] = _prepared(v)
    if "$ref" in out and ("$defs" in out or "definitions" in out):
        out["anyOf"] = [{"$ref": out.pop("$ref")}]
    return out


def schema_gbnf(schema: object) -> str:
    """The GBNF grammar for a JSON schema (checked by `check_schema` first); InvalidGrammar otherwise."""
    check_schema(schema)
    # The converter is untyped upstream.
    converter: Any = cast(Any, _Converter)(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(_prepared(schema), "schema")
        converter.visit(resolved, "")
        gbnf: str = converter.format_grammar()
    except RecursionError:
        raise InvalidGrammar("the schema nests too deeply to convert", subject="schema") from None
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        # The converter's own refusals (an unsupported regex construct in a pattern, say).
        raise InvalidGrammar(f"cannot be converted to a grammar: {e}", subject="schema") from None
    try:
        check_gbnf(gbnf)
    except InvalidGrammar as e:
        raise InvalidGrammar(f"the grammar made from it is refused: {e.message}", subject="schema") from None
    return gbnf


def build_grammar(model: LlamaModel, *, gbnf: str | None = None, schema: object = None) -> Grammar:
    """A compiled grammar from GBNF text (checked first) or a JSON schema. Blocking CPU work: call it
    from a pool thread (the registry's `grammar`)."""
    if gbnf is not None:
        check_gbnf(gbnf)
    text = gbnf if gbnf is not None else schema_gbnf(schema)
    try:
        return Grammar(model, text)
    except ValueError as e:
        raise InvalidGrammar(f"llama.cpp refused the grammar: {e}", subject="grammar" if gbnf is not None else "schema") from None


# ---------------------------------------------------------------------------------------------
# Tool calls: the generic format (llama.cpp's, for models without a tool-call format of their own)


@dataclass(frozen=True)
class ToolSpec:
    """One function a chat request offers the model: its name and its parameters' JSON schema
    (checked by `check_schema`)."""

    name: str
    parameters: Mapping[str, Any]


_ANY_ARGUMENTS: Final[dict[str, Any]] = {"type": "object"}


def _rebased(node: Any, base: str) -> Any:
    """A tool's parameters schema moved under `base` ("#/$defs/<name>"): each local `$ref` of it
    re-pointed there, so it still resolves inside the combined schema."""
    if isinstance(node, list):
        return [_rebased(x, base) for x in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k in ("enum", "const", "default", "examples"):
            out[k] = v  # values, not schemas
        elif k == "$ref" and isinstance(v, str) and v.startswith("#"):
            out[k] = base + v[1:]
        else:
            out[k] = _rebased(v, base)
    return out


def tool_calls_schema(
    tools: Sequence[ToolSpec], *, mode: Literal["auto", "required"], parallel: bool
) -> dict[str, Any]:
    """The JSON schema of a reply in the generic tool-call format:

        {"tool_calls": [{"name": <a tool's name>, "arguments": <that tool's parameters>}, ...]}

    (one call or more; exactly one unless `parallel`), or, with mode "auto", that or

        {"response": "<text for the user>"}

    Each tool's parameters sit in `$defs` under the tool's name (a name is `[a-zA-Z0-9_-]`, safe in
    a JSON pointer), their own local references re-pointed there; the result is checked and compiled
    like any schema (`schema_gbnf`), so a reply that completes always parses and validates."""
    if not tools:
        raise InvalidGrammar("no tools to call", subject="schema")
    defs = {t.name: _rebased(dict(t.parameters) or _ANY_ARGUMENTS, f"#/$defs/{t.name}") for t in tools}
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": {"$ref": f"#/$defs/{t.name}"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    array: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    call_reply = {
        "type": "object",
        "properties": {"tool_calls": array},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if mode == "required":
        return {**call_reply, "$defs": defs}
    text_reply = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [call_reply, text_reply], "$defs": defs}
