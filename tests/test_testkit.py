"""polargrid_local.testing: the fake engines, their script and faults, over both clients and HTTP."""
from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import av
import jsonschema
import openai
import polargrid
import pytest
from conftest import chat_request

from polargrid_local import LocalEngine, PolarGrid, PolarGridSync
from polargrid_local.server import running
from polargrid_local.testing import ScriptError
from polargrid_local.testing.schema import example_for

ROOT = Path(__file__).resolve().parent.parent
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")


@pytest.fixture
def pg(fake_engine, fake):
    return PolarGridSync(engine=fake_engine)


@pytest.fixture(scope="module")
def http(fake_engine):
    with running(fake_engine) as server:
        yield server


def chat(content="Hello", **extra):
    return chat_request(content, **{"model": "gpt-4o-mini", "max_tokens": None, "temperature": None, **extra})


def text_of(chunks):
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def seconds(data: bytes, fmt: str) -> float:
    if fmt == "pcm":
        return len(data) / 2 / 24000
    with av.open(io.BytesIO(data)) as container:
        return sum(f.samples for f in container.decode(audio=0)) / container.streams.audio[0].rate


# -- start-up and imports ------------------------------------------------------------------

def test_fake_client_needs_no_model_files_and_imports_no_engine(tmp_path):
    code = f"""
import sys
from polargrid_local import PolarGridSync
pg = PolarGridSync(fake=True, cache_dir={str(tmp_path)!r})
schema = {{"type": "object", "properties": {{"n": {{"type": "integer"}}}}, "required": ["n"]}}
pg.chat_completion({{"model": "smollm2", "messages": [{{"role": "user", "content": "hi"}}],
                     "response_format": {{"type": "json_schema", "json_schema": {{"schema": schema}}}}}})
pg.embeddings({{"model": "text-embedding-3-small", "input": "hi"}})
audio = pg.text_to_speech({{"model": "tts-1", "input": "Hi there.", "voice": "alloy"}})
assert pg.transcribe(audio, {{"model": "whisper-1"}}).text == "Hi there."
pg.health()
loaded = [m for m in ("llama_cpp", "faster_whisper", "ctranslate2", "piper", "onnxruntime") if m in sys.modules]
assert not loaded, loaded
"""
    env = {**os.environ, "POLARGRID_LOCAL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]


# -- chat script ---------------------------------------------------------------------------

def test_reply_rules_newest_first_times_and_echo(pg):
    pg.fake.chat.reply(r"weather", "Sunny")
    pg.fake.chat.reply(r"weather in Oslo", "Snow", times=1)
    assert pg.chat_completion(chat("weather in Oslo?")).choices[0].message.content == "Snow"
    assert pg.chat_completion(chat("weather in Oslo?")).choices[0].message.content == "Sunny"
    assert pg.chat_completion(chat("hi")).choices[0].message.content == pg.fake.chat.default
    pg.fake.chat.echo()
    assert pg.chat_completion(chat("say this back")).choices[0].message.content == "say this back"
    assert [s.text for s in pg.fake.chat.seen][-1] == "say this back"


def test_fault_rules_expire_after_times_requests(pg):
    """Issue 22 (Also): ``times=`` on fail/stall/slow, checked directly: n faults, then the rule is gone."""
    pg.fake.chat.reply(None, "older rule")
    pg.fake.chat.fail("flaky", polargrid.ServerError("down", 503), times=2)
    outcomes = []
    for _ in range(4):
        try:
            outcomes.append(pg.chat_completion(chat("flaky call")).choices[0].message.content)
        except polargrid.ServerError as exc:
            outcomes.append(exc.status_code)
    assert outcomes == [503, 503, "older rule", "older rule"]
    # a stall or slow rule carries no reply of its own: while it lives, the fake's default answers (late)
    pg.fake.chat.stall("stuck", seconds=0.05, times=1)
    pg.fake.chat.slow("slow", delay=0.01, times=1)
    for text in ("stuck", "slow"):
        answers = [pg.chat_completion(chat(text)).choices[0].message.content for _ in range(2)]
        assert answers == [pg.fake.chat.default, "older rule"], text
    pg.fake.embeddings.fail(None, polargrid.RateLimitError("busy", retry_after=1), times=1)
    with pytest.raises(polargrid.RateLimitError):
        pg.embeddings({"model": "text-embedding-3-small", "input": "x"})
    assert pg.embeddings({"model": "text-embedding-3-small", "input": "x"}).data


def test_stream_pieces_arrive_as_scripted_and_equal_the_fold(pg):
    pg.fake.chat.stream(r"story", ["Once", " upon", " a time."])
    chunks = list(pg.chat_completion_stream(chat("a story"), stream_options={"include_usage": True}))
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == \
        ["Once", " upon", " a time."]
    folded = pg.chat_completion(chat("a story"))
    assert folded.choices[0].message.content == text_of(chunks) == "Once upon a time."
    assert chunks[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == \
        folded.usage.model_dump(exclude={"prompt_tokens_details"})   # the cached part may differ between requests
    assert folded.usage.completion_tokens == 5


def test_tokens_budget_stops_and_context_window_behave_like_the_engine(pg):
    pg.fake.chat.reply(None, "one two three four five six")
    short = pg.chat_completion(chat(max_tokens=3))
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert short.choices[0].message.content == "one two three"
    stopped = pg.chat_completion(chat(stop=[" four"]))
    assert stopped.choices[0].message.content == "one two three" and stopped.choices[0].finish_reason == "stop"
    with pytest.raises(polargrid.ValidationError, match="context window"):
        pg.chat_completion(chat("word " * 6000))   # past the default model's 4,096 tokens
    pg.fake.chat.stream(None, ["one two", " three four"])  # the budget can end inside a piece
    cut = pg.chat_completion(chat(max_tokens=3))
    assert cut.choices[0].message.content == "one two three" and cut.choices[0].finish_reason == "length"
    done = pg.completion({"model": "smollm2", "prompt": ["a", "b"], "max_tokens": 2})
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens == 4


PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20, "minLength": 6},
                                           "age": {"type": "integer", "minimum": 18, "maximum": 150},
                                           "email": {"type": "string", "format": "email"},
                                           "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                           "pets": {"type": "array", "items": {"$ref": "#/$defs/pet"},
                                                    "minItems": 2, "uniqueItems": True},
                                           "kind": {"enum": ["a", "b"]}, "score": {"type": "number",
                                                                                  "exclusiveMinimum": 0}},
          "required": ["name", "age", "pets"], "additionalProperties": False,
          "$defs": {"pet": {"type": "string", "maxLength": 12}}}


def test_json_schema_output_is_generated_from_the_schema_and_validates(pg):
    request = chat("Describe Ann", response_format={"type": "json_schema", "json_schema": {"schema": PERSON}})
    document = json.loads(pg.chat_completion(request).choices[0].message.content)
    jsonschema.validate(document, PERSON)
    assert json.loads(text_of(pg.chat_completion_stream(request))) == document
    for schema in ({"type": "array", "items": {"type": "boolean"}, "maxItems": 0}, {"anyOf": [{"type": "null"}]},
                   {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 7, "minimum": 10}}}):
        jsonschema.validate(example_for(schema), schema)
    pg.fake.chat.reply("Ann", {"name": "Ann"})  # misses required fields
    with pytest.raises(ScriptError, match="does not fit"):
        pg.chat_completion(request)


def test_tool_calls_generated_or_scripted(pg):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"]}}}
    generated = pg.chat_completion(chat("weather?", tools=[tool], tool_choice="required")).choices[0]
    assert generated.finish_reason == "tool_calls" and generated.message.content is None
    jsonschema.validate(json.loads(generated.message.tool_calls[0].function.arguments),
                        tool["function"]["parameters"])
    assert pg.chat_completion(chat("weather?", tools=[tool])).choices[0].message.tool_calls is None  # auto: text
    pg.fake.chat.tool_call("Paris", "get_weather", {"city": "Paris", "unit": "c"})
    chunks = list(pg.chat_completion_stream(chat("weather in Paris?", tools=[tool])))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert json.loads(calls[0].function["arguments"]) == {"city": "Paris", "unit": "c"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# -- faults --------------------------------------------------------------------------------

def test_errors_raise_before_anything_streams_in_process_and_over_http(pg, http):
    pg.fake.chat.fail(r"boom", polargrid.RateLimitError("slow down", retry_after=2))
    with pytest.raises(polargrid.RateLimitError) as info:
        pg.chat_completion(chat("boom"))
    assert info.value.retry_after == 2
    stream = pg.chat_completion_stream(chat("boom"))
    with pytest.raises(polargrid.RateLimitError):
        next(iter(stream))
    oai = openai.OpenAI(base_url=http.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.RateLimitError) as http_info:
        oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "boom"}])
    assert http_info.value.response.headers["Retry-After"] == "2"
    for error, cls in ((polargrid.NotFoundError("gone"), openai.NotFoundError),
                       (polargrid.ValidationError("bad", {"field": "x"}), openai.BadRequestError),
                       (polargrid.ServerError("down", 503), openai.InternalServerError)):
        pg.fake.chat.fail(None, error, times=1)
        with pytest.raises(cls):
            oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
    pg.fake.chat.fail(None, polargrid.TimeoutError("too slow"), times=1)
    with pytest.raises(polargrid.TimeoutError):
        pg.chat_completion(chat())


def test_a_stream_cut_midway_delivers_its_pieces_then_the_error(pg, http):
    pg.fake.chat.stream(None, ["a", "b", "c", "d"])
    pg.fake.chat.fail(None, polargrid.ServerError("engine died", 500), after=2)
    got = []
    with pytest.raises(polargrid.ServerError, match="engine died"):
        for chunk in pg.chat_completion_stream(chat()):
            got += [chunk.choices[0].delta.content] if chunk.choices and chunk.choices[0].delta.content else []
    assert got == ["This", " is"]  # the fail rule is newest: its own (default) reply, cut after 2 pieces
    oai = openai.OpenAI(base_url=http.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="engine died"):
        list(oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}],
                                         stream=True))


def test_slow_streams_pace_their_pieces_and_stalls_hold_until_closed(pg):
    pg.fake.chat.stream("slow", ["a", "b", "c"], delay=0.1)
    stamps = []
    for chunk in pg.chat_completion_stream(chat("slow")):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
    assert min(b - a for a, b in zip(stamps, stamps[1:])) >= 0.08
    pg.fake.chat.stall("stuck")
    stuck = pg.chat_completion_stream(chat("stuck"))
    assert next(iter(stuck)).choices[0].delta.role == "assistant"
    assert pg.chat_completion(chat("meanwhile")).choices[0].message.content  # other requests go on
    scheduler = pg.engine.pool.worker(pg.engine.pool.resolve("gpt-4o-mini", "chat"))[0].backend.scheduler
    assert scheduler.active == 1
    stuck.close()
    deadline = time.monotonic() + 10
    while scheduler.active and time.monotonic() < deadline:
        time.sleep(0.01)
    assert scheduler.active == 0


def test_async_client_streams_and_faults(fake_engine, tmp_path):
    fake_engine.fake.reset()
    fake_engine.fake.chat.stream("hi", ["x", "y"])
    client = PolarGrid(engine=fake_engine)

    async def run():
        chunks = [c async for c in client.chat_completion_stream(chat("hi"))]
        fake_engine.fake.chat.fail(None, polargrid.NotFoundError("nope"), times=1)
        with pytest.raises(polargrid.NotFoundError):
            await client.chat_completion(chat("hi"))
        return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]

    assert asyncio.run(run()) == ["x", "y"]

    async def created():
        async with await PolarGrid.create(fake=True, cache_dir=tmp_path) as own:  # an empty cache
            status = await own.get_status()
            return (await own.chat_completion(chat("hi"))).choices[0].message.content, status

    content, status = asyncio.run(created())
    assert content == "This is a deterministic reply from the polargrid_local fake engine."
    assert {m.status for m in status.regions[0].models} == {"available"}


# -- embeddings and speech -----------------------------------------------------------------

def test_embeddings_are_deterministic_unit_vectors_of_the_model_size(pg):
    data = pg.embeddings({"model": "text-embedding-3-small", "input": ["cat", "dog", "cat"]}).data
    assert len(data[0].embedding) == 384
    assert data[0].embedding == data[2].embedding != data[1].embedding
    assert abs(sum(x * x for x in data[1].embedding) - 1) < 1e-5
    pg.fake.embeddings.fail("secret", polargrid.ValidationError("no secrets"))
    with pytest.raises(polargrid.ValidationError):
        pg.embeddings({"model": "text-embedding-3-small", "input": ["top secret"]})


@pytest.mark.parametrize("fmt", FORMATS)
def test_speech_in_every_format_round_trips_and_follows_length_and_speed(pg, fmt):
    short, long = "Hello there.", "Hello there. This sentence makes the clip a good deal longer than the first."
    clips = {(text, speed): pg.text_to_speech({"model": "tts-1", "input": text, "voice": "alloy",
                                               "response_format": fmt, "speed": speed})
             for text in (short, long) for speed in (1.0, 2.0)}
    assert seconds(clips[(long, 1.0)], fmt) > 2 * seconds(clips[(short, 1.0)], fmt)
    ratio = seconds(clips[(long, 2.0)], fmt) / seconds(clips[(long, 1.0)], fmt)
    assert 0.45 < ratio < 0.55
    if fmt != "pcm":
        assert pg.transcribe(clips[(long, 2.0)], {"model": "whisper-1"}).text == long


def test_transcripts_scripted_formats_and_faults(pg):
    audio = pg.text_to_speech({"model": "tts-1", "input": "One. Two three.", "voice": "nova", "response_format": "wav"})
    verbose = pg.transcribe(audio, {"model": "whisper-1", "response_format": "verbose_json",
                                    "timestamp_granularities": ["word"]})
    assert [s.text for s in verbose.segments] == [" One.", " Two three."] and len(verbose.words) == 3
    assert pg.transcribe(audio, {"model": "whisper-1", "response_format": "srt"}).startswith("1\n00:00:00,000 --> ")
    pg.fake.stt.transcript("Scripted words.", times=1)
    assert pg.transcribe(audio, {"model": "whisper-1", "response_format": "text"}) == "Scripted words."
    events = list(pg.transcribe_stream(audio, {"model": "whisper-1"}))
    assert events[-1].text == "One. Two three."
    pg.fake.stt.fail(None, polargrid.ServerError("stt down", 503))
    with pytest.raises(polargrid.ServerError):
        pg.transcribe(audio, {"model": "whisper-1"})
    pg.fake.tts.fail("Bad", polargrid.ValidationError("no", {"field": "input"}))
    with pytest.raises(polargrid.ValidationError):
        pg.text_to_speech({"model": "tts-1", "input": "Bad input", "voice": "alloy"})


# -- the CLI, the plugin and the example app -------------------------------------------------

def test_serve_fake_answers_over_http(tmp_path):
    env = {**os.environ, "POLARGRID_LOCAL_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "polargrid_local", "serve", "--fake", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = proc.stderr.readline()
        url = line.split("serving on ")[1].split()[0]
        oai = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        reply = oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content
    finally:
        proc.terminate()
        proc.wait(10)


def test_plugin_fixtures_marker_reset_and_real_switch(tmp_path):
    (tmp_path / "test_user.py").write_text('''
import asyncio, openai, polargrid, pytest

@pytest.mark.polargrid(replies={"hello": "Hi!", "boom": polargrid.RateLimitError("x", retry_after=1)})
def test_marker(polargrid_sync):
    assert polargrid_sync.chat_completion({"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}]}).choices[0].message.content == "Hi!"
    with pytest.raises(polargrid.RateLimitError):
        polargrid_sync.chat_completion({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "boom"}]})

def test_reset_between_tests(polargrid_sync, polargrid_fake):
    assert polargrid_sync.chat_completion({"model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}]}).choices[0].message.content != "Hi!"

def test_async_and_server(polargrid, polargrid_server):
    reply = asyncio.run(polargrid.chat_completion({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}))
    oai = openai.OpenAI(base_url=polargrid_server.openai_base_url, api_key="x", max_retries=0)
    assert oai.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
                                       ).choices[0].message.content == reply.choices[0].message.content
''')
    env = {**os.environ, "POLARGRID_LOCAL_CACHE": str(tmp_path / "empty")}
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_user.py")]
    fake = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "3 passed" in fake.stdout, fake.stdout[-3000:]
    real = subprocess.run(base + ["--polargrid-real", "-k", "reset"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert "1 skipped" in real.stdout, real.stdout[-3000:]


def test_example_app_runs_with_no_model_files(tmp_path):
    env = {**os.environ, "POLARGRID_LOCAL_CACHE": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/example_app"],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:]
    assert not list(tmp_path.iterdir())


# -- the fakes follow the real engine's interfaces ------------------------------------------

def test_fake_embeddings_honour_dimensions(pg):
    data = pg.embeddings({"model": "text-embedding-3-small", "input": ["cat", "dog"], "dimensions": 8}).data
    assert [len(d.embedding) for d in data] == [8, 8]
    assert all(abs(sum(x * x for x in d.embedding) - 1) < 1e-5 for d in data)
    with pytest.raises(polargrid.ValidationError):
        pg.embeddings({"model": "text-embedding-3-small", "input": "cat", "dimensions": 385})


def test_unloading_a_fake_model_ends_its_requests_with_the_unload_error(caplog):
    engine = LocalEngine(fake=True)
    try:
        engine.fake.chat.stall(r"hang")
        stream = engine.chat_completion_stream({"model": "smollm2", "messages": [{"role": "user", "content": "hang"}]})
        next(stream)                                  # the role chunk: the request holds a slot
        engine.unload_model({"model_name": "smollm2"})
        with pytest.raises(polargrid.ServerError) as info:
            list(stream)
        assert info.value.status_code == 503
        assert not [r for r in caplog.records if "freeing" in r.getMessage()]   # the fake frees cleanly
    finally:
        engine.close()


def test_a_fake_engine_answers_remote_entries_itself_and_probes_nothing(tmp_path, monkeypatch):
    import socket

    attempts = []
    real_connect = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", lambda self, addr: attempts.append(addr) or real_connect(self, addr))
    models = tmp_path / "models.toml"
    models.write_text('[[models]]\nid = "cluster-chat"\nkind = "chat"\n'
                      '[models.remote]\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "big"\n')
    engine = LocalEngine(models, fake=True)
    try:
        engine.fake.chat.reply(r"hello", "Hi from the fake.")
        reply = engine.chat_completion({"model": "cluster-chat", "messages": [{"role": "user", "content": "hello"}]})
        assert reply.choices[0].message.content == "Hi from the fake."
        assert engine.get_model_status().remote["cluster-chat"] == "up"
        assert attempts == []
    finally:
        engine.close()


def test_keep_alive_in_a_transcription_form_over_http():
    import urllib.request

    engine = LocalEngine(fake=True)
    with running(engine) as server:
        try:
            audio = PolarGridSync(engine=engine).text_to_speech({"model": "tts-1", "input": "Hello there.",
                                                                 "voice": "alloy", "response_format": "wav"})
            boundary = "pgboundary"
            fields = {"model": "whisper-1", "keep_alive": "7"}
            body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
                            for k, v in fields.items())
            body += (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                     "Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
            request = urllib.request.Request(f"{server.url}/v1/audio/transcriptions", body,
                                             {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert json.load(response)["text"] == "Hello there."
            status = {m.model: m for m in engine.get_model_status().models}
            assert status["whisper-tiny.en"].keep_alive_s == 7.0
        finally:
            engine.close()
