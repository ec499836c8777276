"""Transcription results in OpenAI's response formats: json, text, srt, vtt, verbose_json."""
from __future__ import annotations

from typing import Any, Literal

from polargrid.types import TranscriptionResponse, TranscriptionSegment, TranslationResponse
from polargrid.types import VerboseTranscriptionResponse as SDKVerbose
from pydantic import BaseModel

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


class TranscriptionWord(BaseModel):
    """One word with its timing (verbose_json with timestamp_granularities=['word'])."""

    word: str
    start: float
    end: float


class VerboseTranscriptionResponse(SDKVerbose):
    """The SDK's verbose_json shape; ``task`` may also be 'translate', and ``words`` holds word timings."""

    task: Literal["transcribe", "translate"]
    words: list[TranscriptionWord] | None = None


def _clock(seconds: float, separator: str) -> str:
    millis = int(round(max(0.0, seconds) * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_srt(segments: list[TranscriptionSegment]) -> str:
    return "".join(f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n\n"
                   for i, s in enumerate(segments, 1))


def to_vtt(segments: list[TranscriptionSegment]) -> str:
    return "WEBVTT\n\n" + "".join(f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n\n"
                                  for s in segments)


def segment_of(raw: Any) -> TranscriptionSegment:
    """A faster-whisper Segment as the SDK's TranscriptionSegment (every field)."""
    return TranscriptionSegment(id=int(raw.id) - 1 if raw.id else 0, seek=int(raw.seek), start=round(raw.start, 3),
                                end=round(raw.end, 3), text=raw.text, tokens=list(raw.tokens),
                                temperature=float(raw.temperature or 0.0), avg_logprob=float(raw.avg_logprob),
                                compression_ratio=float(raw.compression_ratio),
                                no_speech_prob=float(raw.no_speech_prob))


def build_response(fmt: str, task: str, language: str, duration: float, segments: list[TranscriptionSegment],
                   words: list[TranscriptionWord] | None):
    text = "".join(s.text for s in segments).strip()
    if fmt == "text":
        return text
    if fmt == "srt":
        return to_srt(segments)
    if fmt == "vtt":
        return to_vtt(segments)
    if fmt == "verbose_json":
        return VerboseTranscriptionResponse(task=task, language=language, duration=round(duration, 3), text=text,
                                            segments=segments, words=words)
    return TranslationResponse(text=text) if task == "translate" else TranscriptionResponse(text=text)
