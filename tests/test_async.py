"""The async client: a thin bridge over the same workers; leaving a stream or cancelling a task stops it."""
from __future__ import annotations

import asyncio
import time

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


def _settled_generation(engine, backend, before: int) -> tuple[int, int]:
    """Let the engine run on for a while after the reader left, then: tokens made since ``before``, and
    tokens made during a further quiet second (both small only if the generation really stopped)."""
    spec = engine.registry.get(CHAT)
    deadline = time.monotonic() + 5
    while engine.pool.queue_depth(spec) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    settled = backend.tokens_generated
    time.sleep(1.0)
    return settled - before, backend.tokens_generated - settled


def test_breaking_out_of_async_for_stops_generation(engine):
    """Only ``break``: no aclose(), no close(); the stream is dropped with the loop, as user code does."""
    backend = engine.pool.worker(engine.registry.get(CHAT))[0].backend

    async def main():
        client = PolarGrid(engine=engine)
        before = backend.tokens_generated
        count = 0
        async for _chunk in client.completion_stream({"model": CHAT, "prompt": "1, 2, 3, 4,", "max_tokens": 1000,
                                                      "temperature": 0}):
            count += 1
            if count == 3:
                break
        await asyncio.sleep(0)
        return before

    before = run(main())
    generated, later = _settled_generation(engine, backend, before)
    assert later == 0, f"{later} tokens were generated a second after the loop was left"
    assert generated < 30, f"{generated} tokens were generated for a reader that left after 3"


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
        return before

    before = run(main())
    generated, later = _settled_generation(engine, backend, before)
    assert later == 0, f"{later} tokens were generated a second after the task was cancelled"
    assert generated < 60
    assert engine.chat_completion(chat_request(max_tokens=4)).choices[0].message.content is not None


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


def test_the_async_client_never_blocks_its_loop_on_a_stalled_remote(tmp_path):
    """list_models, get_model, get_model_status and health say whether each remote server answers. A server
    that accepts connections and never replies holds its probe for its timeout (1 s here), but the probe runs
    in the background (issue 22): each call answers at once ("unknown"), while a ticker on the event loop
    keeps ticking."""
    import socket

    from polargrid_local import LocalEngine

    stalled = socket.socket()
    stalled.bind(("127.0.0.1", 0))
    stalled.listen(16)   # never accepted: requests hang until their timeout
    models = tmp_path / "models.toml"
    models.write_text(f'[[models]]\nid = "stalled"\nkind = "chat"\n[models.remote]\n'
                      f'base_url = "http://127.0.0.1:{stalled.getsockname()[1]}/v1"\nmodel = "m"\ntimeout = 1\n')

    async def gaps(call) -> float:
        stamps = [time.monotonic()]
        done = False

        async def tick():
            while not done:
                await asyncio.sleep(0.01)
                stamps.append(time.monotonic())

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await call
        took = time.monotonic() - started
        done = True
        await ticker
        assert took < 0.5, f"the call waited {took:.2f} s on the stalled server's probe"
        return max(b - a for a, b in zip(stamps, stamps[1:]))

    try:
        for method, args in (("list_models", ()), ("get_model", ("stalled",)), ("get_model_status", ()),
                             ("health", ())):
            engine = LocalEngine(models, cache_dir=tmp_path)   # a fresh engine: no probe answer cached yet
            try:
                client = PolarGrid(engine=engine)
                gap = run(gaps(getattr(client, method)(*args)))
                assert gap < 0.1, f"{method} blocked the event loop for {gap:.2f} s"
            finally:
                engine.close()
    finally:
        stalled.close()
