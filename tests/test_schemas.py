"""JSON schemas: bounded before they become grammars (no request can crash the process), enforced in the grammar
where a grammar can, and every constrained output validated with jsonschema before it is returned as a stop."""
from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import textwrap

import polargrid
import pytest
from conftest import CHAT, ROOT, chat_request

from polargrid_local.limits import DEFAULT_LIMITS
from polargrid_local.llm.schemas import (
    OutputSchema,
    grammar_nesting,
    integer_alternatives,
    render_regex,
    schema_grammar,
)


def json_schema(schema, **extra):
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}, **extra}


# -- integer ranges as digit grammars (no model) -------------------------------------------------

def _ranges():
    rng = random.Random(12)
    fixed = [(1000, 1005), (0, 0), (-5, 5), (-1005, -1000), (7, 123456), (-3, 0), (0, 9), (10, 99), (1, 10 ** 6),
             (-10 ** 6, -1), (999, 1001), (-99, 100)]
    spans = [10 ** rng.randint(0, 7) for _ in range(40)]
    return fixed + [(lo, lo + rng.randint(0, span)) for span in spans for lo in [rng.randint(-10 ** 7, 10 ** 7)]]


@pytest.mark.parametrize("low, high", _ranges())
def test_integer_range_grammar_matches_exactly_the_range(low, high):
    pattern = re.compile(render_regex(integer_alternatives(low, high)))
    window = [v for edge in (low, high) for v in range(edge - 1500, edge + 1500)]
    window += random.Random(low).sample(range(low - 10 ** 6, high + 10 ** 6), 2000)
    wrong = [v for v in window if (pattern.fullmatch(str(v)) is not None) != (low <= v <= high)]
    assert not wrong, wrong[:10]
    for text in ("-0", "01", f"0{max(low, 1)}", " 5", "+1"):
        assert pattern.fullmatch(text) is None, text


# -- limits, checked before conversion (no model) ------------------------------------------------

def nested(levels: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("schema, limit, path", [
    ({"type": "string", "maxLength": 20000}, "schema_max_repetition", "#/maxLength"),
    ({"type": "object", "properties": {"s": {"type": "string", "minLength": 5000}}}, "schema_max_repetition",
     "#/properties/s/minLength"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2_000_000}, "schema_max_repetition", "#/minItems"),
    ({"type": "object", "maxProperties": 10 ** 9}, "schema_max_repetition", "#/maxProperties"),
    (nested(DEFAULT_LIMITS.schema_max_depth + 1), "schema_max_depth", None),
    ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(501)}}, "schema_max_properties",
     "#/properties"),
    ({"type": "string", "enum": [str(i) for i in range(501)]}, "schema_max_enum", "#/enum"),
    ({"type": "string", "description": "x" * 70_000}, "schema_max_bytes", "#"),
    ({"type": "string", "pattern": "^a{0,500}$"}, "grammar_max_nesting", None),
])
def test_a_schema_past_a_limit_is_refused_naming_the_limit_and_path(schema, limit, path):
    with pytest.raises(polargrid.ValidationError) as info:
        schema_grammar(schema, "response_format.json_schema.schema")
    assert info.value.details["limit"] == limit and limit in str(info.value)
    assert info.value.details["field"] == "response_format.json_schema.schema"
    if path:
        assert info.value.details["path"] == path


def test_deeply_nested_json_in_a_schema_is_refused_not_a_recursion_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(polargrid.ValidationError, match="schema_max_depth"):
        schema_grammar({"type": "array", "enum": [deep]}, "response_format.json_schema.schema")


@pytest.mark.parametrize("schema, words", [
    ({"type": "integer", "minimum": 10, "maximum": 3}, "no integer"),
    ({"type": "integer", "exclusiveMinimum": 4, "exclusiveMaximum": 5}, "no integer"),
    ({"type": "string", "minLength": 5, "maxLength": 3}, "minLength 5 is greater than maxLength 3"),
])
def test_an_unsatisfiable_bound_is_refused(schema, words):
    with pytest.raises(polargrid.ValidationError, match=words):
        schema_grammar(schema, "f")


def test_grammars_stay_flat_and_strings_refuse_control_characters():
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 2000}, "a": {"type": "array", "items": {"type": "string"},
                                                        "minItems": 2000, "maxItems": 2000}}}
    grammar = schema_grammar(schema, "f")
    assert grammar_nesting(grammar) < 20  # the old converter nested one group per optional repeat
    char = next(line for line in grammar.splitlines() if line.startswith("char ::="))
    assert r"\x00-\x1F" in char


def test_output_schema_names_the_problem_and_where():
    output = OutputSchema({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 7}}}, "f")
    assert output.problem('{"n": 14}') is None
    assert "$.n" in output.problem('{"n": 15}') and "multipleOf" in output.problem('{"n": 15}')
    assert "not complete JSON" in output.problem('{"n": 1')


# -- with the model ---------------------------------------------------------------------------

CRASHERS = {
    "response_format": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        **json_schema({"type": "string", "maxLength": 20000})},
    "tool parameters": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                        "tool_choice": "required", "tools": [{"type": "function", "function": {
                            "name": "f", "parameters": {"type": "object",
                                                        "properties": {"s": {"type": "string", "maxLength": 20000}}}}}]},
    "huge minItems": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                      **json_schema({"type": "array", "items": {"type": "integer"}, "minItems": 20_000_000})},
    "pattern quantifier": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                           **json_schema({"type": "string", "pattern": "^a{0,20000}$"})},
}


def test_the_payloads_that_crashed_the_process_get_400_and_it_goes_on_serving():
    """In a child process, so that a crash fails this test instead of killing pytest (on the old code the
    child died of SIGSEGV, exit -11, on the first payload)."""
    script = textwrap.dedent(f"""
        import http.client, json, threading, polargrid
        from polargrid_local import LocalEngine, Registry
        from polargrid_local.server import running
        engine = LocalEngine(Registry.load({str(ROOT / 'models.toml')!r}))
        serving = running(engine)
        server = serving.__enter__()
        for name, payload in json.loads({json.dumps(json.dumps(CRASHERS))}).items():
            try:
                engine.chat_completion(payload)
                print("engine", name, "accepted")
            except polargrid.ValidationError as exc:
                print("engine", name, "400", exc.details.get("limit"))
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
            conn.request("POST", "/v1/chat/completions", body=json.dumps(payload),
                         headers={{"Content-Type": "application/json"}})
            response = conn.getresponse()
            print("http", name, response.status, json.loads(response.read())["details"].get("limit"))
        reply = engine.chat_completion({{"model": {CHAT!r}, "messages": [{{"role": "user", "content": "hi"}}],
                                         "max_tokens": 3, "temperature": 0}})
        print("served", reply.usage.completion_tokens)
        server.shutdown()
        engine.close()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    lines = done.stdout.splitlines()
    for name in CRASHERS:
        limit = "grammar_max_nesting" if name == "pattern quantifier" else "schema_max_repetition"
        assert f"engine {name} 400 {limit}" in lines and f"http {name} 400 {limit}" in lines, lines
    assert "served 3" in lines


def test_integer_bounds_hold_where_the_model_wants_another_number(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1000, "maximum": 1005}},
              "required": ["n"], "additionalProperties": False}
    reply = client.chat_completion(chat_request("Reply with JSON holding the number 7.", max_tokens=20,
                                                **json_schema(schema)))
    assert reply.choices[0].finish_reason == "stop"
    assert 1000 <= json.loads(reply.choices[0].message.content)["n"] <= 1005


def test_lengths_and_item_counts_hold(client):
    schema = {"type": "object", "properties": {
        "word": {"type": "string", "minLength": 6, "maxLength": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 3}},
        "required": ["word", "tags"], "additionalProperties": False}
    reply = client.chat_completion(chat_request("Give a short word and one tag as JSON.", max_tokens=60,
                                                **json_schema(schema)))
    assert reply.choices[0].finish_reason == "stop"
    document = json.loads(reply.choices[0].message.content)
    assert 6 <= len(document["word"]) <= 9 and 2 <= len(document["tags"]) <= 3


def test_tool_arguments_hold_integer_bounds(client):
    tool = {"type": "function", "function": {"name": "set_level", "parameters": {
        "type": "object", "properties": {"level": {"type": "integer", "minimum": 1000, "maximum": 1005}},
        "required": ["level"]}}}
    reply = client.chat_completion(chat_request("Set the level to 7.", tools=[tool], tool_choice="required",
                                                max_tokens=40))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert 1000 <= json.loads(reply.choices[0].message.tool_calls[0].function.arguments)["level"] <= 1005


# "required" names a property the object may not have: no grammar can produce it, so only the check after
# generation can catch it (as for multipleOf, uniqueItems, minProperties...).
UNSATISFIED = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a", "zzz"],
               "additionalProperties": False}


def test_a_complete_output_that_violates_the_schema_is_an_error_not_a_stop(client):
    request = chat_request("Give me JSON.", max_tokens=30, **json_schema(UNSATISFIED))
    with pytest.raises(polargrid.ValidationError) as info:
        client.chat_completion(request)
    assert info.value.details["reason"] == "output_violates_schema" and "zzz" in str(info.value)
    chunks = []
    with pytest.raises(polargrid.ValidationError):
        for chunk in client.chat_completion_stream(request):
            chunks.append(chunk)
    assert not any(c.choices and c.choices[0].finish_reason for c in chunks)


def test_tool_arguments_that_violate_the_parameters_are_an_error(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": UNSATISFIED}}
    with pytest.raises(polargrid.ValidationError) as info:
        client.chat_completion(chat_request("Call f.", tools=[tool], tool_choice="required", max_tokens=40))
    assert info.value.details["field"] == "tools[0].function.parameters"


def test_output_cut_by_max_tokens_ends_with_length(client):
    reply = client.chat_completion(chat_request("Give me JSON.", max_tokens=3, **json_schema(UNSATISFIED)))
    assert reply.choices[0].finish_reason == "length"
