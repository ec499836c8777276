"""`make demo`: the SDK's README flow, run offline against the local engines."""
from __future__ import annotations

import asyncio
import time

from polargrid import NotFoundError

from .client import PolarGrid


async def _demo(models, cache_dir) -> int:
    client = await PolarGrid.create(models=models, cache_dir=cache_dir)
    async with client:
        print(f"region: {client.get_region_id()} ({client.get_region_name()})")
        print("models:", ", ".join(m.id for m in (await client.list_models()).data if m.parent is None))

        request = {"model": "smollm2", "messages": [{"role": "user", "content": "Write one sentence about cats."}],
                   "max_tokens": 48, "temperature": 0}
        reply = await client.chat_completion(request)
        meta = reply.pg_metadata
        print(f"\nchat> {reply.choices[0].message.content}")
        print(f"      ({reply.usage.completion_tokens} tokens; load {meta.model_load_time_ms} ms, "
              f"inference {meta.inference_time_ms} ms)")

        print("\nstream> ", end="", flush=True)
        started = time.perf_counter()
        async for chunk in client.chat_completion_stream({**request, "messages": [
                {"role": "user", "content": "Name three colours."}]}):
            for choice in chunk.choices:
                print(choice.delta.content or "", end="", flush=True)
        print(f"\n        ({time.perf_counter() - started:.2f}s)")

        try:
            await client.chat_completion({**request, "model": "no-such-model"})
        except NotFoundError as exc:
            print(f"\nunknown model -> polargrid.NotFoundError: {exc}")
    return 0


def run_demo(models=None, cache_dir=None) -> int:
    """Run the demo; returns a process exit code."""
    return asyncio.run(_demo(models, cache_dir))
