"""`make demo`: the SDK's README flow, run offline against the local engines."""
from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from polargrid import NotFoundError

from ..client import PolarGrid


async def _demo(models, cache_dir) -> int:
    client = await PolarGrid.create(models=models, cache_dir=cache_dir)
    async with client:
        print(f"region: {client.get_region_id()} ({client.get_region_name()})")
        print("models:", ", ".join(m.id for m in (await client.list_models()).data if m.parent is None))

        alias = "gpt-4o-mini"
        request = {"model": alias, "messages": [{"role": "user", "content": "Write one sentence about cats."}],
                   "max_tokens": 48, "temperature": 0}
        served_by = (await client.get_model(alias)).root
        reply = await client.chat_completion(request)
        meta = reply.pg_metadata
        print(f"\nchat ({alias} is {served_by})> {reply.choices[0].message.content}")
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

        sentence = "Local speech synthesis and recognition, with no network at all."
        started = time.perf_counter()
        audio = await client.text_to_speech({"model": "tts-1", "input": sentence, "voice": "alloy",
                                             "response_format": "mp3"})
        out = Path(tempfile.gettempdir()) / "polargrid-local-demo.mp3"
        out.write_bytes(audio)
        print(f"\nspeech> {sentence!r} -> {out} ({len(audio)} bytes, {time.perf_counter() - started:.2f}s)")
        started = time.perf_counter()
        heard = await client.transcribe(out, {"model": "whisper-1", "response_format": "verbose_json"})
        assert not isinstance(heard, str)
        print(f"transcribe> {heard.text!r} (language {heard.language}, {heard.duration:.1f}s of audio, "
              f"{time.perf_counter() - started:.2f}s)")
    return 0


def run_demo(models=None, cache_dir=None) -> int:
    """Run the demo; returns a process exit code."""
    return asyncio.run(_demo(models, cache_dir))
