"""Chat completions on the real SmolLM2 model: streams, sampling, stops, usage, metadata."""
from __future__ import annotations

import polargrid
from conftest import CHAT, chat_request
from polargrid.types import ChatCompletionChunk as SDKChunk
from polargrid.types import ChatCompletionRequest, ChatCompletionResponse, Message


def text_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_chat_returns_sdk_types_with_usage_and_local_metadata(client):
    reply = client.chat_completion(chat_request())
    assert isinstance(reply, ChatCompletionResponse)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    meta = reply.pg_metadata
    assert meta.region == "local"
    assert meta.latency_ms >= meta.inference_time_ms > 0
    assert meta.queue_time_ms >= 0 and meta.model_load_time_ms >= 0


def test_request_object_and_dict_agree(client):
    as_dict = client.chat_completion(chat_request("Name a fruit."))
    as_object = client.chat_completion(ChatCompletionRequest(
        model=CHAT, messages=[Message(role="user", content="Name a fruit.")], max_tokens=32, temperature=0))
    assert as_dict.choices[0].message.content == as_object.choices[0].message.content


def test_stream_equals_non_stream_at_temperature_zero(client):
    request = chat_request("Tell me about the sea.", max_tokens=40)
    reply = client.chat_completion(request)
    chunks = list(client.chat_completion_stream(request))
    assert all(isinstance(c, SDKChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 5, "tokens should arrive as separate chunks"
    assert text_of(chunks) == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_include_usage_adds_a_final_usage_chunk(client):
    request = chat_request(max_tokens=8)
    chunks = list(client.chat_completion_stream(request, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    dict_form = list(client.chat_completion_stream({**request, "stream_options": {"include_usage": True}}))
    # the same counts (how much of the prompt was cached, prompt_tokens_details, may differ between requests)
    assert dict_form[-1].usage.model_dump(exclude={"prompt_tokens_details"}) == \
        last.usage.model_dump(exclude={"prompt_tokens_details"})
    assert list(client.chat_completion_stream(request))[-1].usage is None


def test_same_seed_same_text_and_seeds_matter(client):
    request = chat_request("Invent a name for a dragon.", temperature=1.2, top_p=1.0, max_tokens=24)
    first = client.chat_completion({**request, "seed": 1234}).choices[0].message.content
    second = client.chat_completion({**request, "seed": 1234}).choices[0].message.content
    assert first == second
    others = {client.chat_completion({**request, "seed": s}).choices[0].message.content for s in (1, 2, 3)}
    assert len(others | {first}) > 1


def test_max_tokens_gives_length_finish(client):
    reply = client.chat_completion(chat_request("Count from one to one hundred in words.", max_tokens=5))
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 5


def test_stop_sequence_ends_generation_before_it(client):
    request = chat_request("Count from 1 to 20, separated by commas.", max_tokens=60)
    full = client.chat_completion(request).choices[0].message.content
    assert "5" in full
    stop = "5"
    reply = client.chat_completion({**request, "stop": [stop]})
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert stop not in text
    assert full.startswith(text)
    streamed = text_of(client.chat_completion_stream({**request, "stop": [stop]}))
    assert streamed == text


def test_sampling_knobs_are_accepted_and_change_output(client):
    base = chat_request("Describe a forest.", max_tokens=30)
    plain = client.chat_completion(base).choices[0].message.content
    penalised = client.chat_completion({**base, "repetition_penalty": 1.8, "frequency_penalty": 1.5,
                                        "presence_penalty": 1.0}).choices[0].message.content
    assert plain != penalised
    sampled = client.chat_completion({**base, "temperature": 0.9, "top_k": 5, "top_p": 0.8, "min_p": 0.1,
                                      "seed": 7})
    assert sampled.choices[0].message.content


def test_system_and_multi_turn_messages(client):
    reply = client.chat_completion({"model": "gpt-3.5-turbo", "temperature": 0, "max_tokens": 20, "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"type": "text", "text": "What colour is the sky?"}]}]})
    assert reply.model == "gpt-3.5-turbo"
    assert reply.choices[0].message.content


def test_completion_single_list_and_stream(client):
    reply = client.completion({"model": CHAT, "prompt": "The capital of France is", "max_tokens": 8,
                               "temperature": 0})
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage.completion_tokens <= 8
    both = client.completion({"model": CHAT, "prompt": ["Once upon a time", "The capital of France is"],
                              "max_tokens": 8, "temperature": 0})
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].text == reply.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completion_stream(
        {"model": CHAT, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}) if c.choices)
    assert streamed == reply.choices[0].text


def test_generate_legacy_call(client):
    out = client.generate({"model": CHAT, "prompt": "Say hello.", "max_tokens": 16, "temperature": 0})
    assert out.content and out.usage.completion_tokens > 0 and out.processing_time_ms > 0


def test_sdk_readme_example_runs_unchanged():
    """polargrid-sdk's README quick start, with only the import swapped."""
    import asyncio

    from polargrid_local import PolarGrid

    async def main():
        client = PolarGrid(use_mock_data=True, debug=True)
        response = await client.chat_completion({
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": "Hello!"}],
        })
        print(response.choices[0].message.content)
        async for chunk in client.chat_completion_stream({
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": "Tell me a story"}],
        }):
            if chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="")
        response = await client.completion({"prompt": "Once upon a time", "model": "llama-3.1-8b",
                                            "max_tokens": 100, "temperature": 0.8})
        print(response.choices[0].text)
        try:
            await client.chat_completion({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        except polargrid.NotFoundError:
            pass
        else:
            raise AssertionError("expected polargrid.NotFoundError")
        await client.aclose()
        return response

    assert asyncio.run(main()).choices[0].text
