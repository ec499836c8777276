"""POST /v1/responses, driven by the official openai client (create and the stream helper), and the in-process
client.responses(...) local extra; all on SmolLM2 through the chat completion stream."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest
from conftest import CHAT

from polargrid_local import PolarGrid
from polargrid_local.errors import ValidationError
from polargrid_local.server import running

WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                          "required": ["city"]}}


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_create_returns_a_response_with_text_and_usage(oai):
    response = oai.responses.create(model=CHAT, input="Say hello.", instructions="Answer in one short sentence.",
                                    max_output_tokens=24, temperature=0)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status in ("completed", "incomplete") and response.output_text.strip()
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.usage.input_tokens > 10 and 0 < response.usage.output_tokens <= 24
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"


def test_the_stream_helper_sees_every_event_and_the_same_text(oai):
    request = {"model": CHAT, "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]}],
               "max_output_tokens": 48, "temperature": 0, "text": {"format": {"type": "json_schema", "name": "greeting",
               "schema": {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 20}},
                          "required": ["greeting"]}}}}
    with oai.responses.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text and isinstance(json.loads(deltas)["greeting"], str)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    same = oai.responses.create(**request)  # the non-streaming call is the fold of the same stream
    assert same.output_text == final.output_text


def test_function_tools_and_their_outputs(oai):
    called = oai.responses.create(model=CHAT, input="What is the weather in Rome?", tools=[WEATHER],
                                  tool_choice="required", max_output_tokens=60)
    call = called.output[0]
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert "city" in json.loads(call.arguments)
    with oai.responses.stream(model=CHAT, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required",
                              max_output_tokens=60) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert streamed.output[0].type == "function_call"
    followed = oai.responses.create(model=CHAT, tools=[WEATHER], max_output_tokens=30, temperature=0, input=[
        {"role": "user", "content": "What is the weather in Rome?"},
        {"type": "function_call", "call_id": call.call_id, "name": "get_weather", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 C"}], tool_choice="none")
    assert followed.output[0].type == "message" and followed.output_text.strip()


def test_stateless_and_bad_input_get_a_clear_400(oai):
    with pytest.raises(openai.BadRequestError, match="stateless") as info:
        oai.responses.create(model=CHAT, input="Hi", previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError, match="item_reference"):
        oai.responses.create(model=CHAT, input=[{"type": "item_reference", "id": "msg_1"}])
    with pytest.raises(openai.BadRequestError, match="text only"):
        oai.responses.create(model=CHAT, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    with pytest.raises(openai.BadRequestError, match="built-in tools"):
        oai.responses.create(model=CHAT, input="Hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="unknown parameter"):
        oai.responses.create(model=CHAT, input="Hi", extra_body={"frobnicate": 1})
    with pytest.raises(openai.NotFoundError):
        oai.responses.create(model="nope", input="Hi")
    with pytest.raises(openai.BadRequestError, match="context window"):  # refused before any event is sent
        oai.responses.create(model=CHAT, input="word " * 3000, stream=True)
    accepted = oai.responses.create(model=CHAT, input="Hi", store=False, max_output_tokens=4, metadata={"a": "b"},
                                    parallel_tool_calls=False, truncation="disabled")
    assert accepted.store is False and accepted.metadata == {"a": "b"}


def test_a_failure_after_streaming_began_sends_error_then_response_failed(oai, engine, monkeypatch):
    scheduler = engine.pool.worker(engine.registry.get(CHAT))[0].backend.scheduler
    real, calls = scheduler._sample, []

    def failing(slot, index):
        calls.append(index)
        if len(calls) == 3:
            raise RuntimeError("the GPU caught fire")
        return real(slot, index)

    monkeypatch.setattr(scheduler, "_sample", failing)
    with oai.responses.create(model=CHAT, input="Tell me a story.", max_output_tokens=30, stream=True) as stream:
        events = list(stream)
    monkeypatch.undo()
    assert events[0].type == "response.created" and events[-2].type == "error"
    assert "the GPU caught fire" in events[-2].message
    assert events[-1].type == "response.failed" and events[-1].response.status == "failed"
    assert "the GPU caught fire" in events[-1].response.error.message


def test_in_process_responses_sync_and_async(client, engine):
    reply = client.responses({"model": CHAT, "input": "Name a colour.", "max_output_tokens": 8, "temperature": 0})
    assert reply.status in ("completed", "incomplete") and reply.output_text
    events = list(client.responses_stream({"model": CHAT, "input": "Name a colour.", "max_output_tokens": 8,
                                           "temperature": 0}))
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    assert client.responses({"model": CHAT, "input": "Hi", "stream": True, "max_output_tokens": 2}).streaming
    with pytest.raises(ValidationError, match="stateless"):
        client.responses({"model": CHAT, "input": "Hi", "previous_response_id": "resp_1"})

    async def both():
        pg = PolarGrid(engine=engine)
        folded = await pg.responses({"model": CHAT, "input": "Name a colour.", "max_output_tokens": 8,
                                     "temperature": 0})
        kinds = [e.type async for e in pg.responses_stream({"model": CHAT, "input": "Hi", "max_output_tokens": 4})]
        return folded, kinds

    folded, kinds = asyncio.run(both())
    assert folded.output_text == reply.output_text and kinds[0] == "response.created"
