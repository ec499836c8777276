"""Bad input gets the SDK's typed errors, the engine keeps serving, and abandoned streams stop at once."""
from __future__ import annotations

import threading
import time

import polargrid
import pytest
from conftest import CHAT, chat_request


def wait_idle(engine, model=CHAT, timeout=10.0):
    spec = engine.registry.get(model)
    deadline = time.monotonic() + timeout
    while engine.pool.queue_depth(spec) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.pool.queue_depth(spec) == 0


@pytest.mark.parametrize("request_, error, words", [
    ({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}, polargrid.NotFoundError,
     "no-such-model"),
    ({"model": "whisper-1", "messages": [{"role": "user", "content": "hi"}]}, polargrid.NotFoundError,
     "not a known chat model"),
    ({"model": CHAT, "messages": []}, polargrid.ValidationError, "messages"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, polargrid.ValidationError,
     "max_tokens"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
     polargrid.ValidationError, "max_tokens"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
     polargrid.ValidationError, "temperature"),
    ({"model": CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, polargrid.ValidationError, "role"),
    ({"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, polargrid.ValidationError,
     "stop"),
    ({"model": CHAT, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
     polargrid.ValidationError, "vision"),
    ({"model": CHAT, "messages": [{"role": "tool", "content": "42"}]}, polargrid.ValidationError, "tool_call_id"),
])
def test_bad_requests_raise_typed_errors_and_serving_continues(client, request_, error, words):
    with pytest.raises(error) as info:
        client.chat_completion(request_)
    assert words in str(info.value)
    assert isinstance(info.value, polargrid.PolarGridError)
    assert client.chat_completion(chat_request(max_tokens=4)).choices[0].message.content is not None


def test_prompt_longer_than_context_is_a_validation_error(client, engine):
    long_prompt = "lorem ipsum dolor sit amet " * 800
    with pytest.raises(polargrid.ValidationError) as info:
        client.chat_completion(chat_request(long_prompt))
    assert "context window of 2048 tokens" in str(info.value)
    with pytest.raises(polargrid.ValidationError):
        list(client.chat_completion_stream(chat_request(long_prompt)))
    with pytest.raises(polargrid.ValidationError):
        client.completion({"model": CHAT, "prompt": long_prompt})
    assert client.chat_completion(chat_request(max_tokens=4)).usage.completion_tokens > 0


def test_not_a_request_at_all(client):
    with pytest.raises(polargrid.ValidationError):
        client.chat_completion("hello")


def test_closing_a_stream_stops_generation_at_once(client, engine):
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend
    request = {"model": CHAT, "prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 1000, "temperature": 0}
    before = backend.tokens_generated
    stream = client.completion_stream(request)
    for _ in range(3):
        next(stream)
    stream.close()
    wait_idle(engine)
    assert backend.tokens_generated - before < 20, "the abandoned generation kept running"
    after_close = backend.tokens_generated
    reply = client.chat_completion(chat_request(max_tokens=4))
    assert reply.pg_metadata.queue_time_ms < 1000
    assert backend.tokens_generated - after_close <= 4


def test_a_dropped_stream_is_cancelled_too(client, engine):
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend
    before = backend.tokens_generated
    stream = client.completion_stream({"model": CHAT, "prompt": "1, 2, 3, 4,", "max_tokens": 1000, "temperature": 0})
    next(stream)
    del stream
    wait_idle(engine)
    assert backend.tokens_generated - before < 20


def test_concurrent_callers_get_their_own_answers(client):
    prompts = ["Name a colour.", "Name an animal.", "Name a city.", "Name a fruit.", "Name a planet.",
               "Name a tree."]
    alone = {p: client.chat_completion(chat_request(p, max_tokens=16)).choices[0].message.content for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(prompt: str, streamed: bool) -> None:
        try:
            if streamed:
                text = "".join(c.choices[0].delta.content or "" for c in
                               client.chat_completion_stream(chat_request(prompt, max_tokens=16)) if c.choices)
            else:
                text = client.chat_completion(chat_request(prompt, max_tokens=16)).choices[0].message.content
            results[prompt] = text
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p, i % 2 == 0)) for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert results == alone


@pytest.mark.parametrize("call, request_, field", [
    ("chat_completion", {"model": CHAT, "messages": [{"role": "user", "content": "hi \ud800 there"}]},
     "messages[0].content"),
    ("chat_completion", {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]},
     "stop[0]"),
    ("chat_completion_stream", {"model": CHAT, "messages": [{"role": "user", "content": "\ud83d"}]},
     "messages[0].content"),
    ("completion", {"model": CHAT, "prompt": "tell me \ud800"}, "prompt"),
    ("completion", {"model": CHAT, "prompt": ["fine", "\udc00"]}, "prompt[1]"),
    ("embeddings", {"model": "smollm2-135m-embed", "input": ["ok", "bad \ud800"]}, "input[1]"),
    ("embeddings", {"model": "smollm2-135m-embed", "input": "\ud800"}, "input"),
    ("completion", {"model": CHAT, "prompt": "1, 2,", "seed": "x"}, "seed"),
    ("completion", {"model": CHAT, "prompt": "1, 2,", "seed": 1.5}, "seed"),
    ("completion", {"model": CHAT, "prompt": "1, 2,", "seed": True}, "seed"),
])
def test_client_mistakes_the_engine_used_to_answer_with_500_are_validation_errors(engine, call, request_, field):
    with pytest.raises(polargrid.ValidationError) as info:
        result = getattr(engine, call)(request_)
        if call.endswith("_stream"):
            list(result)
    assert info.value.details["field"] == field, info.value
    assert engine.chat_completion(chat_request(max_tokens=3)).choices[0].message.content is not None
