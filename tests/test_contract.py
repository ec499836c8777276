"""One contract, two engines: the same checks on the real models and on polargrid_local.testing's fakes.

The text checks run on two chat models: SmolLM2 by its own alias, and the default chat model behind the
OpenAI-style aliases (Qwen2.5-Coder-0.5B, with its own template and tool-call dialect).

If the fake drifts from the real engine (types, errors, stream vs fold, stops, usage, budgets, tool
calls, JSON schemas, embeddings, audio containers and durations, transcript formats), this fails.
"""
from __future__ import annotations

import io
import json
import math

import av
import jsonschema
import openai
import polargrid
import pytest
from conftest import DEFAULT_CHAT, chat_request, word_error_rate
from polargrid.types import ChatCompletionResponse, CompletionResponse, EmbeddingResponse, TranscriptionResponse

from polargrid_local import PolarGridSync
from polargrid_local.server import running
from polargrid_local.speech.formats import VerboseTranscriptionResponse
from polargrid_local.types import ChatCompletionChunk

CONTAINERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 30},
                                                "unit": {"type": "string", "enum": ["c", "f"]}},
                                                "required": ["city", "unit"]}}}
SPOKEN = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(params=["real", "fake"])
def pg(request) -> PolarGridSync:
    engine = request.getfixturevalue("engine" if request.param == "real" else "fake_engine")
    if engine.fake is not None:
        engine.fake.reset()
    return PolarGridSync(engine=engine)


@pytest.fixture(params=["smollm2", DEFAULT_CHAT], ids=["smollm2", "default"])
def model(request) -> str:
    return request.param


def chat(content="Write a long story about a dragon.", model="smollm2", **extra):
    return chat_request(content, **{"model": model, "max_tokens": 24, **extra})


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def decoded(data: bytes) -> tuple[str, float]:
    with av.open(io.BytesIO(data)) as container:
        samples = sum(f.samples for f in container.decode(audio=0))
        return container.format.name, samples / container.streams.audio[0].rate


# -- text ----------------------------------------------------------------------------------

def test_chat_types_usage_and_metadata(pg, model):
    reply = pg.chat_completion(chat(model=model))
    assert isinstance(reply, ChatCompletionResponse) and reply.id.startswith("chatcmpl-")
    assert reply.model == model and reply.choices[0].message.role == "assistant"
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.pg_metadata.region == "local" and reply.pg_metadata.latency_ms is not None


def test_stream_equals_fold_with_a_usage_chunk(pg, model):
    chunks = list(pg.chat_completion_stream(chat(model=model), stream_options={"include_usage": True}))
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    folded = pg.chat_completion(chat(model=model))
    assert text_of(chunks) == folded.choices[0].message.content
    # the cached part and the drafts may differ between requests (drafting follows measured step times)
    varying = {"prompt_tokens_details", "completion_tokens_details"}
    assert chunks[-1].usage.model_dump(exclude=varying) == folded.usage.model_dump(exclude=varying)


def test_max_tokens_ends_with_length_and_exact_count(pg, model):
    reply = pg.chat_completion(chat(model=model, max_tokens=3))
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3


def test_a_stop_sequence_ends_the_text_before_it(pg, model):
    reply = pg.chat_completion(chat(model=model, stop=[" "]))
    assert " " not in reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason == "stop"


def test_completion_with_a_list_prompt(pg, model):
    reply = pg.completion({"model": model, "prompt": ["Once upon a time", "The sky is"], "max_tokens": 4,
                           "temperature": 0})
    assert isinstance(reply, CompletionResponse) and [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    assert 0 < reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 0


@pytest.mark.parametrize("call", [
    lambda pg: pg.chat_completion(chat(model="no-such-model")),
    lambda pg: pg.embeddings({"model": "no-such-model", "input": "x"}),
    lambda pg: pg.text_to_speech({"model": "no-such-model", "input": "x", "voice": "alloy"}),
    lambda pg: pg.transcribe(b"RIFF", {"model": "no-such-model"}),
    lambda pg: pg.chat_completion(chat(model="whisper-1")),
], ids=["chat", "embeddings", "tts", "stt", "wrong-kind"])
def test_unknown_models_are_not_found(pg, call):
    with pytest.raises(polargrid.NotFoundError):
        call(pg)


@pytest.mark.parametrize("call, words", [
    (lambda pg: pg.chat_completion({**chat(), "messages": []}), "(?i)messages"),
    (lambda pg: pg.chat_completion(chat(stop=[""])), "stop"),
    (lambda pg: pg.chat_completion(chat(top_k=-1)), "top_k"),
    (lambda pg: pg.chat_completion(chat("word " * 5000)), "context window"),
    (lambda pg: pg.chat_completion(chat("word " * 5000, model=DEFAULT_CHAT)), "context window"),
    (lambda pg: pg.chat_completion(chat(response_format={"type": "json_schema", "json_schema": {"schema": {
        "type": 5}}})), "valid JSON schema"),
    (lambda pg: pg.embeddings({"model": "text-embedding-3-small", "input": ""}), "Input"),
    (lambda pg: pg.text_to_speech({"model": "tts-1", "input": "x", "voice": "alloy", "speed": 10}), "Speed"),
    (lambda pg: pg.text_to_speech({"model": "tts-1", "input": "x", "voice": "nobody"}), "voice"),
    (lambda pg: pg.transcribe(b"not audio", {"model": "whisper-1"}), "audio"),
], ids=["no-messages", "empty-stop", "top_k", "too-long", "too-long-default", "bad-schema", "empty-input", "speed",
        "voice", "not-audio"])
def test_bad_fields_are_validation_errors(pg, call, words):
    with pytest.raises(polargrid.ValidationError, match=words):
        call(pg)


def test_tool_calls_have_the_sdk_shape(pg, model):
    reply = pg.chat_completion(chat("What is the weather in Paris?", model=model, max_tokens=80, tools=[WEATHER],
                                    tool_choice="required"))
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_json_schema_output_fits(pg, model):
    reply = pg.chat_completion(chat("Describe a person called Ann.", model=model, max_tokens=80, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}))
    jsonschema.validate(json.loads(reply.choices[0].message.content), PERSON)


def test_embeddings_shape_and_normalisation(pg):
    reply = pg.embeddings({"model": "text-embedding-3-small", "input": ["a cat", "a dog", "a cat"]})
    assert isinstance(reply, EmbeddingResponse) and [d.index for d in reply.data] == [0, 1, 2]
    vectors = [d.embedding for d in reply.data]
    assert {len(v) for v in vectors} == {384}
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-3 for v in vectors)
    assert vectors[0] == pytest.approx(vectors[2], abs=1e-5) and vectors[0] != vectors[1]
    assert reply.usage.prompt_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens


# -- speech --------------------------------------------------------------------------------

def test_speech_containers_and_duration(pg):
    durations = {}
    for fmt, container in CONTAINERS.items():
        name, seconds = decoded(pg.text_to_speech({"model": "tts-1", "input": SPOKEN, "voice": "alloy",
                                                    "response_format": fmt}))
        assert container in name.split(",") and seconds > 0.5
        durations[fmt] = seconds
    pcm = pg.text_to_speech({"model": "tts-1", "input": SPOKEN, "voice": "alloy", "response_format": "pcm"})
    assert len(pcm) / 2 / 24000 == pytest.approx(durations["wav"], rel=0.1)  # piper's noise: lengths vary a little
    fast = decoded(pg.text_to_speech({"model": "tts-1", "input": SPOKEN, "voice": "alloy", "response_format": "wav",
                                      "speed": 2.0}))[1]
    assert 0.4 < fast / durations["wav"] < 0.6
    short = decoded(pg.text_to_speech({"model": "tts-1", "input": "Hi.", "voice": "alloy",
                                       "response_format": "wav"}))[1]
    assert short < durations["wav"] / 2


def test_transcript_response_formats(pg):
    audio = pg.text_to_speech({"model": "tts-1", "input": SPOKEN, "voice": "alloy", "response_format": "wav"})
    plain = pg.transcribe(audio, {"model": "whisper-1"})
    assert isinstance(plain, TranscriptionResponse) and word_error_rate(SPOKEN, plain.text) < 0.3
    assert pg.transcribe(audio, {"model": "whisper-1", "response_format": "text"}) == plain.text
    assert pg.transcribe(audio, {"model": "whisper-1", "response_format": "srt"}).startswith("1\n00:00:")
    assert pg.transcribe(audio, {"model": "whisper-1", "response_format": "vtt"}).startswith("WEBVTT\n\n00:00:")
    verbose = pg.transcribe(audio, {"model": "whisper-1", "response_format": "verbose_json",
                                    "timestamp_granularities": ["word"]})
    assert isinstance(verbose, VerboseTranscriptionResponse) and verbose.language == "en"
    assert verbose.segments and verbose.segments[-1].end <= verbose.duration + 0.05 and verbose.words
    events = list(pg.transcribe_stream(audio, {"model": "whisper-1"}))
    assert events[-1].type == "transcript.text.done" and events[-1].text == plain.text


# -- over HTTP -----------------------------------------------------------------------------

def test_http_facade_answers_and_errors_the_same(pg, model):
    with running(pg.engine) as server:
        oai = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        stream = oai.chat.completions.create(model=model, max_tokens=8, temperature=0, stream=True,
                                             messages=[{"role": "user", "content": "Hello"}])
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        with pytest.raises(openai.NotFoundError):
            oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            oai.chat.completions.create(model=model, messages=[])
