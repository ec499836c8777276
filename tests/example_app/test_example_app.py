"""The example app's own tests: only the polargrid_local pytest plugin's fixtures, no model files.

Fake engines by default (well under 5 s); `pytest tests/example_app --polargrid-real` runs the same
tests on the real models (the tests that script exact replies skip there).
"""
from __future__ import annotations

import asyncio
import io

import av
import polargrid
import pytest
from summary_app import brief, brief_streaming

ARTICLE = ("The city council met on Tuesday and voted to build a new library near the river. "
           "Construction starts in spring and should take two years.")


def mp3_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        return sum(frame.samples for frame in container.decode(audio=0)) / container.streams.audio[0].rate


def test_briefing_has_a_summary_and_playable_audio(polargrid_sync):
    result = brief(polargrid_sync, ARTICLE)
    assert result.summary
    assert result.tokens_used > 0
    assert mp3_seconds(result.audio) > 0.2


@pytest.mark.polargrid(replies={r"Summarise:.*library": "A library will be built by the river."})
def test_summary_is_the_models_reply(polargrid_sync, polargrid_fake):
    result = brief(polargrid_sync, ARTICLE)
    assert result.summary == "A library will be built by the river."
    assert polargrid_fake.chat.seen[-1].text.startswith("Summarise: The city council")


def test_spoken_summary_round_trips_through_speech_to_text(polargrid_sync, polargrid_fake):
    polargrid_fake.chat.reply("library", "The council approved a new library.")
    result = brief(polargrid_sync, ARTICLE)
    assert polargrid_sync.transcribe(result.audio, {"model": "whisper-1"}).text == result.summary


def test_retries_a_rate_limit_then_succeeds(polargrid_sync, polargrid_fake):
    polargrid_fake.chat.fail(None, polargrid.RateLimitError("slow down", retry_after=1), times=1)
    assert brief(polargrid_sync, ARTICLE).summary
    assert len(polargrid_fake.chat.seen) == 2


def test_gives_up_after_repeated_timeouts(polargrid_sync, polargrid_fake):
    polargrid_fake.chat.fail(None, polargrid.TimeoutError("model too slow"))
    with pytest.raises(polargrid.TimeoutError):
        brief(polargrid_sync, ARTICLE, retries=2)
    assert len(polargrid_fake.chat.seen) == 3


def test_a_server_error_is_not_retried(polargrid_sync, polargrid_fake):
    polargrid_fake.chat.fail(None, polargrid.ServerError("engine crashed", 500))
    with pytest.raises(polargrid.ServerError):
        brief(polargrid_sync, ARTICLE)
    assert len(polargrid_fake.chat.seen) == 1


def test_streaming_summary_with_the_async_client(polargrid):
    assert asyncio.run(brief_streaming(polargrid, ARTICLE))


def test_the_same_app_works_over_http_with_both_clients(polargrid_server):
    import openai

    remote = polargrid.PolarGrid(base_url=polargrid_server.base_url, api_key="test", max_retries=0)
    assert asyncio.run(brief_streaming(remote, ARTICLE))
    oai = openai.OpenAI(base_url=polargrid_server.openai_base_url, api_key="test", max_retries=0)
    reply = oai.chat.completions.create(model="gpt-4o-mini", max_tokens=20,
                                        messages=[{"role": "user", "content": f"Summarise: {ARTICLE}"}])
    assert reply.choices[0].message.content
