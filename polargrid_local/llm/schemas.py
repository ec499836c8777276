"""JSON schemas for constrained decoding: bounded before conversion, turned into a grammar that enforces
what a grammar can, and every output validated against the whole schema afterwards.

Enforced while decoding (the grammar): type, properties/required, additionalProperties, items/prefixItems,
minItems/maxItems, minLength/maxLength (strings without pattern/format), enum, const, anyOf/oneOf (as
alternatives), allOf (object properties), local $ref, pattern, format date/time/date-time/uuid, and integer
minimum/maximum/exclusiveMinimum/exclusiveMaximum (as digit ranges). Everything else (multipleOf, number
bounds, uniqueItems, min/maxProperties, not, if/then/else, oneOf's exclusivity, lengths next to a
pattern...) is checked with jsonschema when the output is complete: see ``OutputSchema``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, TypeGuard

from ..errors import invalid
from ..limits import DEFAULT_LIMITS, Limits

_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties", "minContains",
           "maxContains")
_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SCHEMA_ONE = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then", "else",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_INTEGER_DIGITS = 16          # an integer with one open bound gets at most this many digits (the library's too)
_GRAMMAR_INTEGER_LIMIT = 10 ** 18  # wider bounds are left to the check after generation


def _number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pointer(path: tuple[Any, ...]) -> str:
    return "#" + "".join(f"/{part}" for part in path)


# -- limits --------------------------------------------------------------------------------


def check_limits(schema: Any, field: str, limits: Limits) -> None:
    """Refuse (ValidationError naming the limit, field and path) a schema past the limits, before any conversion."""
    def refuse(message: str, limit: str, path: tuple[Any, ...]) -> None:
        raise invalid(f"{field}: {message} (limit {limit}; see polargrid_local.Limits)", field=field, limit=limit,
                      path=_pointer(path))

    json_depth_limit = 4 * limits.schema_max_depth + 8  # enum values, defaults and examples nest too
    properties = enums = 0
    stack: list[tuple[Any, tuple[Any, ...], int, int, bool]] = [(schema, (), 0, 0, True)]
    while stack:
        node, path, json_depth, depth, is_schema = stack.pop()
        if json_depth > json_depth_limit or depth > limits.schema_max_depth:
            refuse(f"the schema is nested more than {limits.schema_max_depth} levels deep at {_pointer(path)}",
                   "schema_max_depth", path)
        if isinstance(node, list):
            stack.extend((item, path + (i,), json_depth + 1, depth, is_schema)
                         for i, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        if is_schema:
            for keyword in _BOUNDS:
                value = node.get(keyword)
                if _number(value) and value > limits.schema_max_repetition:
                    refuse(f"{keyword} {value} at {_pointer(path)} is above {limits.schema_max_repetition}",
                           "schema_max_repetition", path + (keyword,))
            for low, high in _PAIRS:
                if _number(node.get(low)) and _number(node.get(high)) and node[low] > node[high]:
                    raise invalid(f"{field}: {low} {node[low]} is greater than {high} {node[high]} at "
                                  f"{_pointer(path)}; nothing can satisfy it", field=field, path=_pointer(path))
            if node.get("type") == "integer":
                lowest, highest = integer_bounds(node)
                if lowest is not None and highest is not None and lowest > highest:
                    raise invalid(f"{field}: no integer lies within the bounds at {_pointer(path)}", field=field,
                                  path=_pointer(path))
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
                if properties > limits.schema_max_properties:
                    refuse(f"more than {limits.schema_max_properties} properties in all", "schema_max_properties",
                           path + ("properties",))
            if isinstance(node.get("enum"), list):
                enums += len(node["enum"])
                if enums > limits.schema_max_enum:
                    refuse(f"more than {limits.schema_max_enum} enum values in all", "schema_max_enum",
                           path + ("enum",))
        for key, value in node.items():
            if not isinstance(value, (dict, list)):
                continue
            sub = is_schema and (key in _SCHEMA_ONE or key in _SCHEMA_LISTS)
            if is_schema and key in _SCHEMA_MAPS and isinstance(value, dict):
                stack.extend((v, path + (key, k), json_depth + 2, depth + 1, True) for k, v in value.items())
            else:
                stack.append((value, path + (key,), json_depth + 1, depth + 1 if sub else depth, sub))
    try:
        size = len(json.dumps(schema))
    except (TypeError, ValueError, RecursionError) as exc:
        raise invalid(f"{field} is not a JSON document: {exc}", field=field) from None
    if size > limits.schema_max_bytes:
        refuse(f"the schema is {size} bytes as JSON, more than {limits.schema_max_bytes}", "schema_max_bytes", ())


def check_grammar(grammar: str, field: str, limits: Limits) -> str:
    """The grammar, if llama.cpp can take it: its parser recurses once per nested group, so depth is bounded."""
    if len(grammar) > limits.grammar_max_bytes:
        raise invalid(f"{field}: the schema becomes a grammar of {len(grammar)} bytes, more than "
                      f"{limits.grammar_max_bytes} (limit grammar_max_bytes)", field=field, limit="grammar_max_bytes")
    nesting = grammar_nesting(grammar)
    if nesting > limits.grammar_max_nesting:
        raise invalid(f"{field}: the schema becomes a grammar nested {nesting} groups deep, more than "
                      f"{limits.grammar_max_nesting} (limit grammar_max_nesting; a pattern's {{m,n}} "
                      "quantifier becomes one group per optional repeat: use maxLength instead)",
                      field=field, limit="grammar_max_nesting")
    return grammar


_OPAQUE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*')


def grammar_nesting(grammar: str) -> int:
    """How deeply parenthesised groups nest in a GBNF grammar (literals, classes and comments skipped)."""
    depth = deepest = 0
    for paren in re.finditer(r"[()]", _OPAQUE.sub("", grammar)):
        depth += 1 if paren.group() == "(" else -1
        deepest = max(deepest, depth)
    return deepest


# -- integers as digit ranges ----------------------------------------------------------------

Atom = tuple  # ("lit", "12") | ("cls", "3", "7") | ("any", n): n digits


def integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    """The smallest and largest integer the schema allows (None: open), from any draft's keywords."""
    low: int | None = None
    high: int | None = None
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    if _number(minimum):
        low = math.floor(minimum) + 1 if schema.get("exclusiveMinimum") is True else math.ceil(minimum)
    if _number(maximum):
        high = math.ceil(maximum) - 1 if schema.get("exclusiveMaximum") is True else math.floor(maximum)
    if _number(schema.get("exclusiveMinimum")):
        bound = math.floor(schema["exclusiveMinimum"]) + 1
        low = bound if low is None else max(low, bound)
    if _number(schema.get("exclusiveMaximum")):
        bound = math.ceil(schema["exclusiveMaximum"]) - 1
        high = bound if high is None else min(high, bound)
    return low, high


def _same_length(low: str, high: str) -> Iterator[list[Atom]]:
    """Alternatives matching exactly the digit strings from low to high, both of one length."""
    if low == high:
        yield [("lit", low)] if low else []
        return
    common = next(i for i, (a, b) in enumerate(zip(low, high, strict=False)) if a != b)
    head = [("lit", low[:common])] if common else []
    a, b, rest = low[common], high[common], len(low) - common - 1
    low_rest, high_rest = low[common + 1:], high[common + 1:]
    first = a if low_rest == "0" * rest else chr(ord(a) + 1)
    last = b if high_rest == "9" * rest else chr(ord(b) - 1)
    if first != a:
        for alt in _same_length(low_rest, "9" * rest):
            yield head + [("lit", a)] + alt
    if first <= last:
        yield head + [("cls", first, last)] + ([("any", rest)] if rest else [])
    if last != b:
        for alt in _same_length("0" * rest, high_rest):
            yield head + [("lit", b)] + alt


def _non_negative(low: int, high: int) -> list[list[Atom]]:
    out: list[list[Atom]] = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        start, end = max(low, 10 ** (digits - 1) if digits > 1 else 0), min(high, 10 ** digits - 1)
        if start <= end:
            out.extend(_same_length(str(start), str(end)))
    return out


def integer_alternatives(low: int, high: int) -> list[list[Atom]]:
    """Alternatives (sequences of atoms) matching exactly the decimal integers low..high, JSON style."""
    out = [[("lit", "-")] + alt for alt in _non_negative(max(1, -high), -low)] if low < 0 else []
    if high >= 0:
        out += _non_negative(max(0, low), high)
    return out


def render_gbnf(alternatives: list[list[Atom]]) -> str:
    def atom(a: Atom) -> str:
        if a[0] == "lit":
            return f'"{a[1]}"'
        if a[0] == "cls":
            return f"[{a[1]}]" if a[1] == a[2] else f"[{a[1]}-{a[2]}]"
        return "[0-9]" if a[1] == 1 else f"[0-9]{{{a[1]}}}"
    return " | ".join(" ".join(atom(a) for a in alt) for alt in alternatives)


def render_regex(alternatives: list[list[Atom]]) -> str:
    def atom(a: Atom) -> str:
        if a[0] == "lit":
            return re.escape(a[1])
        if a[0] == "cls":
            return f"[{a[1]}-{a[2]}]"
        return f"[0-9]{{{a[1]}}}"
    return "|".join("".join(atom(a) for a in alt) for alt in alternatives)


def _grammar_range(schema: dict[str, Any]) -> tuple[int, int] | None:
    low, high = integer_bounds(schema)
    if low is None and high is None:
        return None
    if low is None:
        assert high is not None
        low = -(10 ** max(_INTEGER_DIGITS, len(str(abs(high))) + 1) - 1)
    if high is None:
        high = 10 ** max(_INTEGER_DIGITS, len(str(abs(low))) + 1) - 1
    if max(abs(low), abs(high)) > _GRAMMAR_INTEGER_LIMIT or low > high:
        return None
    return low, high


# -- conversion ------------------------------------------------------------------------------


def _repeat(symbol: str, low: int, high: int | None) -> str:
    """symbol{low,high} as GBNF's flat repetition (llama.cpp expands it into rules, not nested groups)."""
    if high is None:
        return f"{symbol}*" if low == 0 else f"{symbol}+" if low == 1 else f"{symbol}{{{low},}}"
    if high == low:
        return "" if low == 0 else symbol if low == 1 else f"{symbol}{{{low}}}"
    return f"{symbol}?" if (low, high) == (0, 1) else f"{symbol}{{{low},{high}}}"


@lru_cache(maxsize=1)
def _converter_class():
    """llama-cpp-python's converter, extended; built on first use, so planning a request imports no llama.cpp."""
    from llama_cpp.llama_grammar import PRIMITIVE_RULES, RESERVED_NAMES, BuiltinRule, SchemaConverter

    # JSON strings may not hold raw control characters: the library's char rule lets them through.
    strict_rules = {"char": BuiltinRule(r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})', [])}

    class _Converter(SchemaConverter):
        """llama-cpp-python's converter, plus integer ranges, and flat repetitions for lengths and item counts."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)

        def _add_primitive(self, name: str, rule: BuiltinRule):
            return super()._add_primitive(name, strict_rules.get(name, rule))

        def visit(self, schema, name):
            if not isinstance(schema, dict):
                raise ValueError(f"a boolean subschema ({schema!r}) cannot be turned into a grammar")
            if any(k in schema for k in ("$ref", "oneOf", "anyOf", "const", "enum")):
                return super().visit(schema, name)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            if not schema:  # any JSON value (the library reads {} as any object)
                return self._add_rule(rule_name, self._add_primitive("value", PRIMITIVE_RULES["value"]))
            kind = schema.get("type")
            if isinstance(kind, list):  # each type keeps the schema's other keywords
                return self._add_rule(rule_name, self._generate_union_rule(name, [{**schema, "type": t} for t in kind]))
            if kind == "integer" and (bounds := _grammar_range(schema)):
                return self._add_rule(rule_name, f"({render_gbnf(integer_alternatives(*bounds))}) space")
            if kind == "string" and ("minLength" in schema or "maxLength" in schema) and not _special_string(schema):
                char = self._add_primitive("char", PRIMITIVE_RULES["char"])
                body = _repeat(char, int(schema.get("minLength", 0)), _int_or_none(schema.get("maxLength")))
                return self._add_rule(rule_name, rf'"\"" {body} "\"" space')
            items = schema.get("items", {} if kind == "array" else None)
            if items is not None and not isinstance(items, list) and "prefixItems" not in schema and (
                    "minItems" in schema or "maxItems" in schema):
                item = (self._add_primitive("value", PRIMITIVE_RULES["value"]) if items == {} else
                        self.visit(items, f"{name}{'-' if name else ''}item"))
                low, high = int(schema.get("minItems", 0)), _int_or_none(schema.get("maxItems"))
                if high == 0:
                    body = ""
                else:
                    more = _repeat(f'("," space {item})', max(low - 1, 0), None if high is None else high - 1)
                    body = f"{item} {more}"
                    body = body if low > 0 else f"({body})?"
                return self._add_rule(rule_name, f'"[" space {body} "]" space')
            return super().visit(schema, name)

    return _Converter


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _special_string(schema: dict[str, Any]) -> bool:
    """A pattern or a format the converter knows: those rules win, and lengths are checked afterwards."""
    from llama_cpp.llama_grammar import STRING_FORMAT_RULES

    fmt = schema.get("format") or ""
    return "pattern" in schema or bool(re.match(r"^uuid[1-5]?$", fmt)) or f"{fmt}-string" in STRING_FORMAT_RULES


def check_schema(schema: Any, field: str, limits: Limits = DEFAULT_LIMITS) -> None:
    """A schema within the limits and valid against the JSON Schema meta-schema (no conversion, no llama.cpp)."""
    import jsonschema

    if not isinstance(schema, dict):
        raise invalid(f"{field} must be a JSON schema object", field=field)
    check_limits(schema, field, limits)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise invalid(f"{field} is not a valid JSON schema: {exc.message}", field=field) from None


def to_gbnf(schema: dict[str, Any], field: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """The GBNF grammar of a schema that passed check_schema, bounded in size and nesting."""
    converter = _converter_class()()
    try:
        converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), "")
        grammar = converter.format_grammar()
    except Exception as exc:  # the converter asserts on what it cannot express
        raise invalid(f"{field} uses JSON schema features the grammar converter does not support: {exc}",
                      field=field) from None
    return check_grammar(grammar, field, limits)


def schema_grammar(schema: Any, field: str, limits: Limits = DEFAULT_LIMITS) -> str:
    """A GBNF grammar for the schema, after checking it against the limits and the JSON Schema meta-schema."""
    check_schema(schema, field, limits)
    return to_gbnf(schema, field, limits)


# -- after generation --------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputSchema:
    """The schema a finished output must satisfy, and where in the request it came from."""

    schema: dict[str, Any]
    field: str

    def problem(self, text: str) -> str | None:
        """None when the text is JSON that satisfies the schema; otherwise what is wrong, and where."""
        try:
            document = json.loads(text)
        except (ValueError, RecursionError) as exc:
            return f"the output is not complete JSON ({exc})"
        return self.problem_with(document)

    def problem_with(self, document: Any) -> str | None:
        import jsonschema

        validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        try:
            error = jsonschema.exceptions.best_match(validator.iter_errors(document))
        except RecursionError:
            return "the output is nested too deeply to validate"
        if error is None:
            return None
        return f"at {error.json_path}, {error.message[:300]} (keyword {error.validator!r})"

    def violation(self, text: str, problem: str):
        """The error for an output that completed but does not satisfy the schema."""
        return invalid(f"The model's output does not satisfy {self.field}: {problem}. The grammar enforces only "
                       "some keywords while decoding; the rest are checked when the output is complete "
                       "(README: 'Structured output'). Retry with another seed or relax the schema.",
                       field=self.field, reason="output_violates_schema", output=text[:2000])
