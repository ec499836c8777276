"""Record and replay: every client shape, streams as chunks, errors, and loud misses."""
from __future__ import annotations

import asyncio
import json

import polargrid
import pytest
from conftest import chat_request

from polargrid_local import PolarGrid, PolarGridSync
from polargrid_local.server import running
from polargrid_local.testing import Cassette, CassetteMiss


def chat(content):
    return chat_request(content, model="gpt-4o-mini", max_tokens=None, temperature=None)


def test_sync_client_round_trip_with_streams_audio_errors(tmp_path, fake_engine, fake):
    path = tmp_path / "sync.json"
    fake.chat.stream("story", ["Once", " upon"])
    fake.chat.fail("boom", polargrid.RateLimitError("slow down", retry_after=3))
    fake.chat.fail("cut", polargrid.ServerError("died", 500), after=1)
    recorder = Cassette(path).record(PolarGridSync(engine=fake_engine))
    reply = recorder.chat_completion(chat("hello"))
    chunks = list(recorder.chat_completion_stream(chat("a story")))
    audio = recorder.text_to_speech({"model": "tts-1", "input": "Hi.", "voice": "alloy", "response_format": "wav"})
    text = recorder.transcribe(audio, {"model": "whisper-1", "response_format": "text"})
    vectors = recorder.embeddings({"model": "text-embedding-3-small", "input": ["a", "b"]})
    with pytest.raises(polargrid.RateLimitError):
        recorder.chat_completion(chat("boom"))
    cut = []
    with pytest.raises(polargrid.ServerError):
        for chunk in recorder.chat_completion_stream(chat("cut")):
            cut.append(chunk)
    assert json.loads(path.read_text())["format"] == "polargrid-cassette/1"

    fake.chat.reply(None, "the engine must not be asked during replay")
    replay = Cassette(path).replay()
    assert replay.chat_completion(chat("hello")) == reply
    assert list(replay.chat_completion_stream(chat("a story"))) == chunks
    assert replay.text_to_speech({"model": "tts-1", "input": "Hi.", "voice": "alloy",
                                  "response_format": "wav"}) == audio
    assert replay.transcribe(audio, {"model": "whisper-1", "response_format": "text"}) == text == "Hi."
    assert replay.embeddings({"model": "text-embedding-3-small", "input": ["a", "b"]}) == vectors
    with pytest.raises(polargrid.RateLimitError) as info:
        replay.chat_completion(chat("boom"))
    assert info.value.retry_after == 3 and info.value.message == "slow down"
    replayed = []
    with pytest.raises(polargrid.ServerError, match="died"):
        for chunk in replay.chat_completion_stream(chat("cut")):
            replayed.append(chunk)
    assert replayed == cut
    with pytest.raises(CassetteMiss, match=r"chat_completion\(.*never recorded"):
        replay.chat_completion(chat("never recorded"))
    with pytest.raises(CassetteMiss, match="text_to_speech"):
        replay.text_to_speech({"model": "tts-1", "input": "Other.", "voice": "alloy"})


def test_async_client_round_trip(tmp_path, fake_engine, fake):
    path = tmp_path / "async.json"
    fake.chat.stream("hi", ["a", "b"])

    async def record():
        client = Cassette(path).record(PolarGrid(engine=fake_engine))
        return await client.chat_completion(chat("x")), [c async for c in client.chat_completion_stream(chat("hi"))]

    async def replay():
        client = Cassette(path).replay()
        return await client.chat_completion(chat("x")), [c async for c in client.chat_completion_stream(chat("hi"))]

    assert asyncio.run(record()) == asyncio.run(replay())


def test_remote_sdk_recorded_over_http_replays_without_the_server(tmp_path, fake_engine, fake):
    path = tmp_path / "remote.json"
    fake.chat.stream("story", ["Once", " upon", " a time"])

    async def calls(client):
        reply = await client.chat_completion(chat("hello"))
        chunks = [c async for c in client.chat_completion_stream(chat("a story"))]
        return reply.choices[0].message.content, [c.model_dump() for c in chunks]

    with running(fake_engine) as server:
        remote = polargrid.PolarGrid(base_url=server.url, api_key="test", max_retries=0)
        recorded = asyncio.run(calls(Cassette(path).record(remote)))
    assert asyncio.run(calls(Cassette(path).replay())) == recorded
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in recorded[1] if c["choices"]) == \
        "Once upon a time"
