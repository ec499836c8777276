"""response_format and tools: constrained decoding that always parses and fits the schema."""
from __future__ import annotations

import json

import jsonschema
import polargrid
import pytest
from conftest import chat_request

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "pets": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 3}},
          "required": ["name", "age", "pets"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 30}}, "required": ["tz"]}}}


def test_json_object_output_parses(client):
    reply = client.chat_completion(chat_request("Give me a JSON object with the keys name and age for a cat.", max_tokens=120,
                                                response_format={"type": "json_object"}))
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_fits_the_schema(client, temperature):
    request = chat_request("Describe a person called Ann who has two pets.", max_tokens=200, temperature=temperature,
                           seed=3, response_format={"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": PERSON}})
    reply = client.chat_completion(request)
    document = json.loads(reply.choices[0].message.content)
    jsonschema.validate(document, PERSON)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat_completion_stream(request) if c.choices)
    assert json.loads(streamed) == document


def test_tool_choice_required_returns_a_valid_call(client):
    reply = client.chat_completion(chat_request("What is the weather in Paris?", max_tokens=80,
                                                tools=[WEATHER, TIME], tool_choice="required"))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    assert choice.message.content is None


def test_named_tool_choice_calls_that_function(client):
    reply = client.chat_completion(chat_request("Hello there", max_tokens=80, tools=[WEATHER, TIME],
                                                tool_choice={"type": "function", "function": {"name": "get_time"}}))
    call = reply.choices[0].message.tool_calls[0]
    assert call.function.name == "get_time"
    assert "tz" in json.loads(call.function.arguments)


def test_tool_choice_none_answers_in_text(client):
    reply = client.chat_completion(chat_request("What is the weather in Paris?", tools=[WEATHER], tool_choice="none"))
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_tool_choice_auto_gives_text_or_a_valid_call(client):
    reply = client.chat_completion(chat_request("What is the weather in Paris? Use the tool.", max_tokens=80,
                                                tools=[WEATHER]))
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                            WEATHER["function"]["parameters"])
    else:
        assert not choice.message.content.lstrip().startswith("{")


def test_streamed_tool_call_matches_and_conversation_continues(client):
    request = chat_request("Weather in Oslo?", max_tokens=80, tools=[WEATHER], tool_choice="required")
    chunks = list(client.chat_completion_stream(request))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].function["name"] == "get_weather"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    folded = client.chat_completion(request).choices[0].message.tool_calls[0]
    assert json.loads(folded.function.arguments) == json.loads(deltas[0].function["arguments"])
    follow_up = client.chat_completion({**chat_request(max_tokens=30), "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [folded.model_dump()]},
        {"role": "tool", "tool_call_id": folded.id, "content": '{"temp": 3, "unit": "c"}'}], "tools": [WEATHER]})
    answer = follow_up.choices[0]
    assert follow_up.usage.completion_tokens > 0
    assert (answer.finish_reason == "tool_calls" and answer.message.tool_calls) or answer.message.content.strip()


@pytest.mark.parametrize("bad, words", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"x": {"type": "nope"}}}}}]},
     "not a valid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!", "parameters": {"type": "object"}}}]},
     "tool name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "missing"}}}, "not among"),
    ({"tool_choice": "required"}, "without tools"),
    ({"response_format": {"type": "json_schema"}}, "json_schema is required"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}, "valid JSON schema"),
])
def test_malformed_constraints_are_validation_errors(client, bad, words):
    with pytest.raises(polargrid.ValidationError) as info:
        client.chat_completion(chat_request(**bad))
    assert words in str(info.value)
