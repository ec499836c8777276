"""An example application on PolarGrid: summarise a text, then read the summary aloud."""
from __future__ import annotations

from dataclasses import dataclass

import polargrid

SYSTEM = "You summarise texts in one short sentence."


@dataclass
class Briefing:
    summary: str
    audio: bytes          # mp3
    tokens_used: int


def brief(client, text: str, *, model: str = "gpt-4o-mini", voice: str = "alloy", retries: int = 2) -> Briefing:
    """Summarise ``text`` with a chat model and speak the summary; retries on rate limits and timeouts."""
    for attempt in range(retries + 1):
        try:
            reply = client.chat_completion({"model": model, "max_tokens": 60, "temperature": 0, "messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Summarise: {text}"}]})
            break
        except (polargrid.RateLimitError, polargrid.TimeoutError):
            if attempt == retries:
                raise
    summary = (reply.choices[0].message.content or "").strip() or "Nothing to summarise."
    audio = client.text_to_speech({"model": "tts-1", "input": summary, "voice": voice, "response_format": "mp3"})
    return Briefing(summary, audio, reply.usage.total_tokens)


async def brief_streaming(client, text: str, *, model: str = "gpt-4o-mini") -> str:
    """The summary as it streams (async client), joined."""
    parts = []
    async for chunk in client.chat_completion_stream({"model": model, "max_tokens": 60, "messages": [
            {"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Summarise: {text}"}]}):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
    return "".join(parts).strip()
