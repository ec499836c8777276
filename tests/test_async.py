"""The async client: a thin bridge over the same workers; leaving a stream or cancelling a task stops it."""
from __future__ import annotations

import asyncio

import polargrid

from conftest import CHAT, chat_request
from polargrid_local import PolarGrid


def run(coro):
    return asyncio.run(coro)


def test_create_and_chat_and_stream(engine):
    async def main():
        client = await PolarGrid.create(engine=engine)
        assert client.get_region_id() == "local"
        reply = await client.chat_completion(chat_request(max_tokens=20))
        chunks = [c async for c in client.chat_completion_stream(chat_request(max_tokens=20))]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return reply, text

    reply, text = run(main())
    assert text == reply.choices[0].message.content
    assert reply.pg_metadata.region == "local"


def test_breaking_out_of_async_for_stops_generation(engine):
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend

    async def main():
        client = PolarGrid(engine=engine)
        before = backend.tokens_generated
        stream = client.completion_stream({"model": CHAT, "prompt": "1, 2, 3, 4,", "max_tokens": 1000,
                                           "temperature": 0})
        count = 0
        async for _chunk in stream:
            count += 1
            if count == 3:
                break
        await stream.aclose()
        reply = await client.chat_completion(chat_request(max_tokens=4))
        return backend.tokens_generated - before, reply

    generated, reply = run(main())
    assert generated < 30
    assert reply.pg_metadata.queue_time_ms < 1000


def test_cancelling_the_task_stops_generation(engine):
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend

    async def main():
        client = PolarGrid(engine=engine)
        started = asyncio.Event()
        before = backend.tokens_generated

        async def consume():
            async for _chunk in client.completion_stream({"model": CHAT, "prompt": "1, 2, 3,", "max_tokens": 1000,
                                                          "temperature": 0}):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        reply = await client.chat_completion(chat_request(max_tokens=4))
        return backend.tokens_generated - before, reply

    generated, reply = run(main())
    assert generated < 60
    assert reply.choices[0].message.content is not None


def test_many_tasks_at_once_and_errors_are_sdk_errors(engine):
    async def main():
        client = PolarGrid(engine=engine)
        prompts = [f"Say the number {i}." for i in range(5)]
        replies = await asyncio.gather(*(client.chat_completion(chat_request(p, max_tokens=10)) for p in prompts))
        try:
            await client.chat_completion({"model": "nope", "messages": [{"role": "user", "content": "x"}]})
        except polargrid.NotFoundError as exc:
            error = exc
        return replies, error

    replies, error = run(main())
    assert len({r.id for r in replies}) == 5
    assert "nope" in str(error)
