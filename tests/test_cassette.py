"""Record and replay: every client shape, streams as chunks, errors, and loud misses."""
from __future__ import annotations

import asyncio
import json
import sys

import polargrid
import pytest
from conftest import chat_request

from polargrid_local import PolarGrid, PolarGridSync
from polargrid_local.server import running
from polargrid_local.testing import Cassette, CassetteMiss
from polargrid_local.testing.cassette import CassetteError, request_key


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


# -- issue 22: a cassette is data, never code; the same request replays its answers in order -------------

def test_the_same_request_recorded_twice_replays_its_answers_in_order(tmp_path, fake_engine, fake):
    path = tmp_path / "twice.json"
    fake.chat.reply("again", "first answer", times=1)
    fake.chat.reply("again", "second answer", times=1)   # newest first: this one answers first
    fake.chat.stream("tale", ["one"], times=1)
    fake.chat.stream("tale", ["two"], times=1)
    recorder = Cassette(path).record(PolarGridSync(engine=fake_engine))
    recorded = [recorder.chat_completion(chat("again")).choices[0].message.content for _ in range(2)]
    streamed = ["".join(c.choices[0].delta.content or "" for c in recorder.chat_completion_stream(chat("tale"))
                        if c.choices) for _ in range(2)]
    assert recorded == ["second answer", "first answer"] and streamed == ["two", "one"]
    replay = Cassette(path).replay()
    assert [replay.chat_completion(chat("again")).choices[0].message.content for _ in range(3)] == \
        ["second answer", "first answer", "first answer"], "in order, then the last one again"
    assert ["".join(c.choices[0].delta.content or "" for c in replay.chat_completion_stream(chat("tale"))
                    if c.choices) for _ in range(3)] == ["two", "one", "one"]


def _cassette_with(path, *, result=None, error=None):
    entry = {"method": "chat_completion", "key": request_key("chat_completion", (chat("x"),), {}), "kind": "call",
             "result": result, "chunks": [], "error": error}
    path.write_text(json.dumps({"format": "polargrid-cassette/1", "async": False, "interactions": [entry]}))
    return Cassette(path)


@pytest.fixture
def planted_module(tmp_path, monkeypatch):
    """A module on sys.path whose top-level code leaves a mark if anything imports it."""
    mark = tmp_path / "imported"
    (tmp_path / "planted_cassette_module.py").write_text(
        f"open({str(mark)!r}, 'w').close()\nclass Boom(Exception):\n    pass\nclass Model:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield mark
    sys.modules.pop("planted_cassette_module", None)


@pytest.mark.parametrize("where", ["result", "error"])
@pytest.mark.parametrize("name", ["planted_cassette_module:Boom", "planted_cassette_module:Model", "this:s",
                                  "subprocess:Popen", "builtins:object", "polargrid.client:PolarGrid",
                                  "polargrid.types:ChatCompletionResponse.model_validate", "os:system"])
def test_a_cassette_naming_anything_but_sdk_or_local_types_is_refused_before_any_import(
        tmp_path, planted_module, capsys, name, where):
    """Issue 22 item 5: `$model` and error `class` were resolved with importlib on file data."""
    zen_loaded = "this" in sys.modules
    value = {"$model": name, "data": {}} if where == "result" else None
    error = {"class": name, "attrs": {"message": "m"}} if where == "error" else None
    with pytest.raises(CassetteError, match="not a type a cassette may hold") as info:
        _cassette_with(tmp_path / "bad.json", result=value, error=error).replay().chat_completion(chat("x"))
    assert name.split(".model_validate")[0] in str(info.value) and "bad.json" in str(info.value)
    assert not planted_module.exists(), "the planted module's top-level code ran"
    assert "Beautiful is better than ugly" not in capsys.readouterr().out
    assert ("this" in sys.modules) == zen_loaded
    assert "planted_cassette_module" not in sys.modules


def test_sdk_and_local_types_and_errors_still_replay(tmp_path):
    reply = {"$model": "polargrid.types:ChatCompletionResponse", "data": {
        "id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}}
    assert _cassette_with(tmp_path / "ok.json", result=reply).replay().chat_completion(chat("x")).choices
    status = {"$model": "polargrid_local.types:RemoteInfo", "data": {"base_url": "u", "model": "m", "status": "up"}}
    assert _cassette_with(tmp_path / "local.json", result=status).replay().chat_completion(chat("x")).status == "up"
    for name, cls in (("polargrid.errors:RateLimitError", polargrid.RateLimitError),
                      ("polargrid_local.testing.chat:ScriptError", polargrid.ServerError)):
        replay = _cassette_with(tmp_path / "err.json", error={"class": name, "attrs": {"message": "no"}}).replay()
        with pytest.raises(cls, match="no"):
            replay.chat_completion(chat("x"))
