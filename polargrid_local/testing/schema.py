"""A deterministic JSON document for a JSON schema: what a fake model writes under a grammar.

Small and predictable on purpose: every property present, the first of any choice, the smallest
number and string the bounds allow. The result is checked with jsonschema before it is used.
"""
from __future__ import annotations

import math
import re
from typing import Any

import jsonschema

try:  # Python 3.11+
    import re._parser as sre_parse
except ImportError:  # pragma: no cover
    import sre_parse

_FORMATS = {"date-time": "2024-01-01T00:00:00Z", "date": "2024-01-01", "time": "00:00:00Z",
            "email": "user@example.com", "uri": "https://example.com/", "hostname": "example.com",
            "uuid": "00000000-0000-4000-8000-000000000000", "ipv4": "192.0.2.1", "ipv6": "2001:db8::1"}


class SchemaGenerationError(ValueError):
    """The schema uses something this generator cannot satisfy."""


def example_for(schema: dict[str, Any] | None) -> Any:
    """A document that validates against ``schema`` (None: any JSON object)."""
    if schema is None:
        return {}
    document = _instance(schema, schema, "value", 0)
    try:
        jsonschema.validate(document, schema)
    except jsonschema.ValidationError as exc:
        raise SchemaGenerationError(f"could not make a document for this schema ({exc.message}); "
                                    "script the reply with fake.chat.reply()") from None
    return document


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#"):
        raise SchemaGenerationError(f"only local $ref are supported, not {ref!r}")
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def _instance(schema: Any, root: dict[str, Any], name: str, depth: int) -> Any:
    if depth > 32:
        raise SchemaGenerationError("schema nests too deeply")
    if schema is True or not isinstance(schema, dict) or not schema:
        return name
    if "$ref" in schema:
        return _instance({**_resolve(schema["$ref"], root), **{k: v for k, v in schema.items() if k != "$ref"}},
                         root, name, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return _instance({**{k: v for k, v in schema.items() if k != key}, **schema[key][0]}, root, name, depth + 1)
    if "allOf" in schema:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            part = _resolve(part["$ref"], root) if "$ref" in part else part
            merged.setdefault("properties", {}).update(part.get("properties", {}))
            merged["required"] = list(dict.fromkeys(merged.get("required", []) + part.get("required", [])))
            merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
        return _instance(merged, root, name, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    generate: Any = _BY_TYPE[kind]
    return generate(schema, root, name, depth)


def _object(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int) -> dict[str, Any]:
    properties = schema.get("properties", {})
    out = {key: _instance(sub, root, key, depth + 1) for key, sub in properties.items()}
    extra = schema.get("additionalProperties", {})
    for key in schema.get("required", []):
        if key not in out:
            out[key] = _instance(extra if isinstance(extra, dict) else {}, root, key, depth + 1)
    return out


def _array(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int) -> list[Any]:
    prefix = schema.get("prefixItems", [])
    count = max(int(schema.get("minItems", 0)), len(prefix), 1)
    if "maxItems" in schema:
        count = min(count, int(schema["maxItems"]))
    items = schema.get("items", {})
    out = [_instance(prefix[i] if i < len(prefix) else items, root, name, depth + 1) for i in range(count)]
    if schema.get("uniqueItems") and len(out) > 1:
        out = [_vary(item, i) for i, item in enumerate(out)]
    return out


def _vary(item: Any, i: int) -> Any:
    if isinstance(item, str):
        return f"{item}{i}" if i else item
    if isinstance(item, (int, float)) and not isinstance(item, bool):
        return item + i
    return item


def _string(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int) -> str:
    if "pattern" in schema:
        text = _from_pattern(schema["pattern"])
    else:
        text = _FORMATS.get(schema.get("format", ""), name if re.fullmatch(r"\w{1,20}", name) else "value")
    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
    if len(text) < low:
        text += "x" * (low - len(text))
    if high is not None and len(text) > int(high):
        text = text[: int(high)]
    return text


def _number(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int, integer: bool = False) -> float:
    low = schema.get("minimum")
    if "exclusiveMinimum" in schema and not isinstance(schema["exclusiveMinimum"], bool):
        low = schema["exclusiveMinimum"] + (1 if integer else 0.5)
    high = schema.get("maximum")
    if "exclusiveMaximum" in schema and not isinstance(schema["exclusiveMaximum"], bool):
        high = schema["exclusiveMaximum"] - (1 if integer else 0.5)
    value = low if low is not None else (min(0, high) if high is not None else 1)
    step = schema.get("multipleOf")
    if step:
        value = math.ceil(value / step) * step
    return int(math.ceil(value)) if integer else float(value)


def _integer(schema: dict[str, Any], root: dict[str, Any], name: str, depth: int) -> int:
    return int(_number(schema, root, name, depth, integer=True))


_BY_TYPE = {"object": _object, "array": _array, "string": _string, "number": _number, "integer": _integer,
            "boolean": lambda *_: True, "null": lambda *_: None}


def _from_pattern(pattern: str) -> str:
    """The shortest string matching a regular expression (common constructs only)."""
    return _emit(sre_parse.parse(pattern))


def _emit(parsed: Any) -> str:
    out = []
    for op, arg in parsed:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "IN":
            out.append(_first_of(arg))
        elif name == "ANY":
            out.append("a")
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _high, sub = arg
            out.append(_emit(sub) * low)
        elif name == "SUBPATTERN":
            out.append(_emit(arg[-1]))
        elif name == "BRANCH":
            out.append(_emit(arg[1][0]))
        elif name == "CATEGORY":
            out.append(_category(str(arg)))
    return "".join(out)


def _first_of(items: Any) -> str:
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            return chr(arg)
        if name == "RANGE":
            return chr(arg[0])
        if name == "CATEGORY":
            return _category(str(arg))
    return "a"


def _category(name: str) -> str:
    return {"CATEGORY_DIGIT": "0", "CATEGORY_SPACE": " ", "CATEGORY_WORD": "a"}.get(name, "a")
