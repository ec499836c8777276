"""The HTTP facade, driven by polargrid-sdk 0.10.0, the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time

import openai
import polargrid
import pytest
from conftest import CHAT, SENTENCES, word_error_rate
from polargrid.types import EmbeddingRequest

from polargrid_local.host.gpu import NvmlProbe
from polargrid_local.limits import Limits
from polargrid_local.server import running
from polargrid_local.server.security import RateLimiter


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return polargrid.PolarGrid(base_url=server.url, api_key="unused", max_retries=0, timeout=120)  # loaded CI


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def run(coro):
    return asyncio.run(coro)


def raw(server, method, path, body=b"", headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response, data


# -- polargrid-sdk -------------------------------------------------------------------------

def test_sdk_chat_and_completions(sdk):
    request = {"model": CHAT, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 12, "seed": 5}
    reply = run(sdk.chat_completion(dict(request)))
    assert reply.choices[0].message.content and reply.pg_metadata.region == "local"

    async def stream():
        return [c async for c in sdk.chat_completion_stream(dict(request))]

    chunks = run(stream())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    done = run(sdk.completion({"model": CHAT, "prompt": "The capital of France is", "max_tokens": 6}))
    assert done.choices[0].text and done.usage.completion_tokens <= 6

    async def completion_stream():
        return [c async for c in sdk.completion_stream({"model": CHAT, "prompt": "Once", "max_tokens": 6})]

    assert any(c.choices and c.choices[0].text for c in run(completion_stream()))
    generated = run(sdk.generate({"model": CHAT, "prompt": "Hello", "max_tokens": 5}))
    assert generated.content


def test_sdk_tools_and_json_schema_over_http(sdk):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    reply = run(sdk.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "Weather in Rome?"}],
                                     "tools": [tool], "tool_choice": "required", "max_tokens": 60}))
    assert reply.choices[0].finish_reason == "tool_calls"
    assert "city" in json.loads(reply.choices[0].message.tool_calls[0].function.arguments)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    reply = run(sdk.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "Answer in JSON."}],
                                     "response_format": {"type": "json_schema", "json_schema": {"schema": schema}},
                                     "max_tokens": 30}))
    assert isinstance(json.loads(reply.choices[0].message.content)["ok"], bool)


def test_sdk_errors_arrive_as_sdk_exceptions(sdk):
    with pytest.raises(polargrid.NotFoundError, match="nope"):
        run(sdk.chat_completion({"model": "nope", "messages": [{"role": "user", "content": "x"}]}))
    with pytest.raises(polargrid.ValidationError, match="context window"):
        run(sdk.chat_completion({"model": CHAT, "messages": [{"role": "user", "content": "word " * 3000}]}))
    with pytest.raises(polargrid.NotFoundError):
        run(sdk.get_model("no-such-model"))


def test_sdk_embeddings_models_gpu_health(sdk):
    result = run(sdk.embeddings(EmbeddingRequest(model="text-embedding-3-small", input=["a cat", "a dog"])))
    assert len(result.data) == 2 and len(result.data[0].embedding) > 100
    models = run(sdk.list_models())
    assert {"whisper-1", "tts-1", CHAT} <= {m.id for m in models.data}
    assert run(sdk.get_model("hexgrad/Kokoro-82M")).root == "piper-en_US-joe-medium"
    assert run(sdk.load_model({"model_name": "smollm2-135m-embed"})).status == "success"
    assert "smollm2-135m-embed" in run(sdk.get_model_status()).loaded
    assert "freed" in run(sdk.unload_model({"model_name": "smollm2-135m-embed"})).message
    assert run(sdk.get_gpu_status()).total_gpus == NvmlProbe().device_count()
    assert isinstance(run(sdk.get_gpu_memory()).memory, list)
    assert run(sdk.health()).status == "healthy"
    assert run(sdk.get_status()).regions[0].region == "local"
    assert run(sdk.get_usage()).usage.total_requests >= 1


def test_sdk_speech_transcription_translation_and_jobs(sdk):
    audio = run(sdk.text_to_speech({"model": "tts-1", "input": SENTENCES[0], "voice": "alloy",
                                    "response_format": "wav"}))
    assert audio[:4] == b"RIFF"

    async def speech_stream():
        return [c async for c in sdk.text_to_speech_stream({"model": "tts-1", "input": " ".join(SENTENCES),
                                                            "voice": "nova"})]

    chunks = run(speech_stream())
    assert b"".join(chunks)[:4] == b"OggS"
    streamed = run(sdk.transcribe(audio, {"model": "whisper-1"}))          # the SDK streams by default
    assert word_error_rate(SENTENCES[0], streamed.text) < 0.2
    verbose = run(sdk.transcribe(audio, {"model": "whisper-1", "response_format": "verbose_json"}))
    assert verbose.language == "en" and verbose.segments
    srt = run(sdk.transcribe(audio, {"model": "whisper-1", "response_format": "srt"}))
    assert srt.startswith("1\n00:00:00,000 --> ")
    text = run(sdk.transcribe(audio, {"model": "whisper-1", "response_format": "text", "stream": False}))
    assert isinstance(text, str) and word_error_rate(SENTENCES[0], text) < 0.2
    translated = run(sdk.translate(audio, {"model": "whisper-1"}))
    assert word_error_rate(SENTENCES[0], translated.text) < 0.3
    job = run(sdk.transcribe_and_wait(audio, model="whisper-1", poll_interval=0.05))
    assert job.status == "completed" and word_error_rate(SENTENCES[0], job.text) < 0.2
    accepted = run(sdk.transcribe_async(audio, model="whisper-1"))
    assert accepted.status == "accepted"
    assert run(sdk.get_transcription_job(accepted.job_id)).job_id == accepted.job_id


# -- openai --------------------------------------------------------------------------------

def test_openai_chat_completions_and_stream(oai):
    reply = oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                        max_tokens=10, temperature=0)
    assert reply.choices[0].message.content and reply.usage.total_tokens > 0
    chunks = list(oai.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=10, temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    completion = oai.completions.create(model=CHAT, prompt="The sky is", max_tokens=5, temperature=0)
    assert completion.choices[0].text


def test_openai_embeddings_speech_transcription(oai):
    vectors = oai.embeddings.create(model="text-embedding-3-small", input=["hello", "world"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 100
    speech = oai.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCES[1], response_format="mp3")
    audio = speech.content
    assert len(audio) > 1000
    text = oai.audio.transcriptions.create(model="whisper-1", file=("s.mp3", audio), response_format="text")
    assert word_error_rate(SENTENCES[1], text) < 0.2
    verbose = oai.audio.transcriptions.create(model="whisper-1", file=("s.mp3", audio),
                                              response_format="verbose_json", timestamp_granularities=["word"])
    assert verbose.words and verbose.segments and verbose.language == "en"
    vtt = oai.audio.transcriptions.create(model="whisper-1", file=("s.mp3", audio), response_format="vtt")
    assert vtt.startswith("WEBVTT")
    translation = oai.audio.translations.create(model="whisper-1", file=("s.mp3", audio))
    assert word_error_rate(SENTENCES[1], translation.text) < 0.3
    assert oai.models.retrieve("whisper-1").id == "whisper-1"
    assert any(m.id == "tts-1" for m in oai.models.list())


def test_openai_errors_read_well(oai):
    with pytest.raises(openai.NotFoundError) as info:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "NotFoundError" and "nope" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oai.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    assert "max_tokens" in info.value.message and info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="voice"):
        oai.audio.speech.create(model="tts-1", voice="darth", input="Hello")
    with pytest.raises(openai.BadRequestError, match="not a readable audio file"):
        oai.audio.transcriptions.create(model="whisper-1", file=("x.wav", b"definitely not audio" * 10))


# -- raw HTTP ------------------------------------------------------------------------------

def test_malformed_requests(server):
    response, body = raw(server, "POST", "/v1/chat/completions", b"{not json",
                         {"Content-Type": "application/json"})
    assert response.status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    response, body = raw(server, "POST", "/v1/chat/completions", b"[1, 2]")
    assert response.status == 400
    response, body = raw(server, "GET", "/v1/nothing-here")
    assert response.status == 404 and json.loads(body)["code"] == "NotFoundError"
    response, _ = raw(server, "DELETE", "/v1/chat/completions")
    assert response.status == 405 and response.getheader("Allow") == "POST"
    response, body = raw(server, "POST", "/v1/audio/transcriptions", b"--x\r\nbroken",
                         {"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status == 400
    response, body = raw(server, "POST", "/v1/audio/transcriptions", b"{}", {"Content-Type": "application/json"})
    assert response.status == 400 and "multipart" in json.loads(body)["message"]
    response, _ = raw(server, "HEAD", "/health")
    assert response.status == 200


def test_oversized_body_is_refused_unread(engine):
    with running(engine, limits=Limits(max_body_bytes=1000)) as srv:
        host, port = srv.server_address[:2]
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n"
                         b"Content-Type: application/json\r\n\r\n{")
            reply = b""
            try:
                while b"byte limit" not in reply:
                    piece = sock.recv(65536)
                    if not piece:
                        break
                    reply += piece
            except ConnectionResetError:  # the server closes with the unread body still queued
                pass
        assert reply.startswith(b"HTTP/1.1 413") and b"byte limit" in reply


def test_api_keys_and_rate_limit(engine):
    with running(engine, api_keys=["pg_secret_one", "pg_secret_two"], rate_limit=3) as srv:
        srv.limiter = RateLimiter(3, clock=lambda: 90.0)  # mid-minute for ever: no window can roll over mid-test
        response, _ = raw(srv, "GET", "/health")
        assert response.status == 200
        response, body = raw(srv, "GET", "/v1/models")
        assert response.status == 401 and "API key" in json.loads(body)["message"]
        response, _ = raw(srv, "GET", "/v1/models", headers={"Authorization": "Bearer pg_wrong"})
        assert response.status == 401
        client = polargrid.PolarGrid(base_url=srv.url, api_key="pg_secret_two", max_retries=0)
        assert run(client.list_models()).data
        with pytest.raises(polargrid.AuthenticationError):
            run(polargrid.PolarGrid(base_url=srv.url, api_key="pg_bad", max_retries=0).list_models())
        statuses = [raw(srv, "GET", "/v1/models", headers={"Authorization": "Bearer pg_secret_one"})[0]
                    for _ in range(4)]
        assert [s.status for s in statuses] == [200, 200, 200, 429]
        assert 1 <= int(statuses[-1].getheader("Retry-After")) <= 60
        run(client.list_models())
        run(client.list_models())            # this key's third request of the minute
        with pytest.raises(polargrid.RateLimitError):
            run(client.list_models())


def test_a_client_that_disconnects_cancels_its_generation(server, engine):
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend
    before = backend.tokens_generated
    host, port = server.server_address[:2]
    body = json.dumps({"model": CHAT, "prompt": "1, 2, 3, 4,", "max_tokens": 1000, "temperature": 0,
                       "stream": True}).encode()
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    received = b""
    while received.count(b"data: ") < 3:
        piece = sock.recv(4096)
        assert piece, f"the server closed the stream early: {received!r}"
        received += piece
    sock.close()
    closed_at = time.monotonic()
    spec = engine.registry.get(CHAT)
    while engine.pool.queue_depth(spec) and time.monotonic() - closed_at < 10:
        time.sleep(0.01)
    stopped_after = time.monotonic() - closed_at
    assert engine.pool.queue_depth(spec) == 0
    assert stopped_after < 1.0, f"generation ran on for {stopped_after:.2f}s after the client left"
    assert backend.tokens_generated - before < 200


def test_mid_stream_failure_becomes_an_error_frame(server, engine, monkeypatch):
    scheduler = engine.pool.worker(engine.registry.get(CHAT))[0].backend.scheduler
    real = scheduler._sample
    calls = []

    def failing(slot, index):
        calls.append(index)
        if len(calls) == 3:
            raise RuntimeError("the GPU caught fire")
        return real(slot, index)

    monkeypatch.setattr(scheduler, "_sample", failing)
    response, body = raw(server, "POST", "/v1/chat/completions", json.dumps(
        {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "stream": True}).encode())
    frames = [f for f in body.decode().split("\n\n") if f]
    assert response.status == 200 and frames[-1] == "data: [DONE]"
    error = json.loads(frames[-2][6:])["error"]
    assert "the GPU caught fire" in error["message"] and error["type"] == "server_error"
    monkeypatch.undo()
    reply = json.loads(raw(server, "POST", "/v1/chat/completions", json.dumps(
        {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}).encode())[1])
    assert reply["choices"][0]["message"]["content"], "the engine keeps serving"


def test_concurrent_http_streams(server):
    results, errors = {}, []

    def ask(i):
        try:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
            stream = client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": f"Count to {i}"}],
                                                    max_tokens=12, temperature=0, stream=True)
            results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4 and all(results.values())


def test_audio_stream_failing_midway_ends_incomplete_and_serving_goes_on(server, engine, monkeypatch):
    backend = engine.pool.worker(engine.registry.get("tts-1"))[0].backend
    real = backend.synthesize

    def failing(*args, **kwargs):
        for i, audio in enumerate(real(*args, **kwargs)):
            if i == 1:
                raise RuntimeError("the voice broke")
            yield audio

    monkeypatch.setattr(backend, "synthesize", failing)
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/v1/audio/speech", body=json.dumps(
        {"model": "tts-1", "input": " ".join(SENTENCES), "voice": "alloy", "response_format": "pcm",
         "stream": True}))
    response = conn.getresponse()
    assert response.status == 200
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    conn.close()
    monkeypatch.undo()
    response, body = raw(server, "POST", "/v1/audio/speech", json.dumps(
        {"model": "tts-1", "input": "Still here.", "voice": "alloy", "response_format": "wav"}).encode())
    assert response.status == 200 and body[:4] == b"RIFF"
