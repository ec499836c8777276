"""Fake speech backends: TTS that writes its text's fingerprint into the audio, STT that reads it back.

The fake voice sounds a chord: a pilot tone and 24 tones, one per bit of a hash of the text. Chords
survive every codec (mp3, opus, aac at their bit rates), resampling and the decoder, so the fake STT
finds the hash in any clip the fake TTS made in this process and returns its text: round trips work
through both clients and HTTP. Clip length is (0.2 s + seconds_per_char per character) / speed per
sentence, so duration follows text length and speed like a real voice.
"""
from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..speech.stt import SttInfo, SttOptions
from ..speech.tts import PiperBackend
from .script import SpeechScript, TranscriptScript
from .tokens import pieces

PILOT_HZ = 400.0
BIT_HZ = tuple(700.0 + 200.0 * i for i in range(24))
AMPLITUDE = 0.025
_SENTENCE = re.compile(r"[^.!?]+[.!?]*\s*|[.!?]+\s*")

_spoken: dict[int, str] = {}
_spoken_lock = threading.Lock()


def fingerprint(text: str) -> int:
    """The 24-bit hash the fake voice sounds for this text."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:3], "big")


def chord(code: int, start: int, count: int, rate: int) -> np.ndarray:
    """``count`` samples of the chord for ``code``, from sample ``start`` (phase runs on across calls)."""
    t = (np.arange(start, start + count, dtype=np.float64)) / rate
    out = np.sin(2 * np.pi * PILOT_HZ * t)
    for bit, hz in enumerate(BIT_HZ):
        if code >> bit & 1:
            out += np.sin(2 * np.pi * hz * t)
    ramp = min(count // 2, int(0.005 * rate))
    if ramp:  # soft edges: no clicks between sentences
        out[:ramp] *= np.linspace(0.0, 1.0, ramp)
        out[-ramp:] *= np.linspace(1.0, 0.0, ramp)
    return (AMPLITUDE * out).astype(np.float32)


def read_chord(audio: np.ndarray, rate: int) -> int | None:
    """The code a fake clip carries, or None when the audio is not one (real speech, silence)."""
    if audio.size < rate // 20:
        return None
    window = np.hanning(audio.size)
    spectrum = np.abs(np.fft.rfft(audio.astype(np.float64) * window))
    hz_per_bin = rate / audio.size

    def level(hz: float) -> float:
        centre = int(round(hz / hz_per_bin))
        return float(spectrum[max(0, centre - 2): centre + 3].max())

    pilot = level(PILOT_HZ)
    if pilot <= 0 or pilot < 0.2 * float(spectrum.max()):
        return None
    code = sum(1 << bit for bit, hz in enumerate(BIT_HZ) if level(hz) > 0.4 * pilot)
    return code


def spoken_text(audio: np.ndarray, rate: int) -> str | None:
    """The text of a clip the fake TTS made in this process, if this is one."""
    code = read_chord(audio, rate)
    with _spoken_lock:
        return _spoken.get(code) if code is not None else None


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE.findall(text) if s.strip()] or [text]


class FakeTtsBackend(PiperBackend):
    """A PiperBackend (the same voice names and speakers) whose voice is the fingerprint chord."""

    def __init__(self, model_id: str, script: SpeechScript, voices: dict[str, int] | None = None,
                 output_sample_rate: int = 24000) -> None:
        self.model_id = model_id
        self.script = script
        self.voice: Any = None
        self.sample_rate = output_sample_rate
        self.output_sample_rate = output_sample_rate
        self.voices = {k.lower(): int(v) for k, v in (voices or {"default": 0}).items()}

    def synthesize(self, text: str, speed: float, speaker: int, cancelled=lambda: False) -> Iterator[np.ndarray]:
        rule = self.script.match(text, self.model_id, speed=speed)
        if rule is not None and rule.error is not None and rule.after is None:
            raise rule.error
        code = fingerprint(text)
        with _spoken_lock:
            _spoken[code] = text
        position = 0
        for index, sentence in enumerate(sentences(text)):
            if rule is not None:
                _pace(rule, index, cancelled)
            if cancelled():
                return
            seconds = (0.2 + self.script.seconds_per_char * len(sentence.strip())) / speed
            count = int(round(seconds * self.sample_rate))
            yield chord(code, position, count, self.sample_rate)
            position += count


def _pace(rule: Any, index: int, cancelled) -> None:
    """A rule's faults at piece ``index``: the delay before it, a stall, or the error."""
    if rule.stall is not None and index == (rule.after or 0):
        _wait(rule.stall, cancelled)
    elif index and rule.delay:
        _wait(rule.delay, cancelled)
    if rule.error is not None and rule.after is not None and index == rule.after:
        raise rule.error


def _wait(seconds: float, cancelled) -> None:
    end = time.monotonic() + seconds
    while not cancelled() and time.monotonic() < end:
        time.sleep(min(0.01, max(0.0, end - time.monotonic())))


@dataclass
class FakeWord:
    word: str
    start: float
    end: float


@dataclass
class FakeSegment:
    """The fields of a faster-whisper Segment that speech/formats.py reads."""

    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float = 0.0
    avg_logprob: float = -0.1
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0
    words: list[FakeWord] | None = field(default=None)


class FakeSttBackend:
    """Transcribes from the script, else the text the fake TTS put in the clip, else the script's default."""

    def __init__(self, model_id: str, script: TranscriptScript, english_only: bool = False) -> None:
        self.model_id = model_id
        self.script = script
        self.english_only = english_only
        self.sample_rate = 16000

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """Fake speech is English: whisper-1 routes it to its English model, as the real engine does."""
        return "en", 1.0

    def transcribe(self, audio: np.ndarray, options: SttOptions, ctx=None) -> Iterator[SttInfo | FakeSegment]:
        duration = audio.size / self.sample_rate
        rule = self.script.match("", self.model_id, task=options.task, language=options.language)
        if rule is not None and rule.error is not None and rule.after is None:
            raise rule.error
        text = "".join(rule.pieces) if rule is not None and rule.pieces is not None else None
        if text is None:
            text = spoken_text(audio, self.sample_rate)
        if text is None:
            text = self.script.default
        cancelled = (lambda: ctx.cancelled) if ctx is not None else (lambda: False)
        yield SttInfo(options.language or "en", 1.0, duration)
        parts = sentences(text) if text.strip() else []
        total = sum(len(p) for p in parts) or 1
        start = 0.0
        for index, part in enumerate(parts):
            if rule is not None:
                _pace(rule, index, cancelled)
            if cancelled():
                return
            end = round(start + duration * len(part) / total, 3)
            yield FakeSegment(id=index + 1, seek=0, start=round(start, 3), end=end, text=" " + part.strip(),
                              tokens=list(range(len(pieces(part)))),
                              words=_words(part, start, end) if options.word_timestamps else None)
            start = end


def _words(text: str, start: float, end: float) -> list[FakeWord]:
    words = text.split()
    step = (end - start) / max(1, len(words))
    return [FakeWord(" " + w, round(start + i * step, 3), round(start + (i + 1) * step, 3))
            for i, w in enumerate(words)]
