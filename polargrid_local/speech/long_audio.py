"""Long audio in bounded windows: decode, VAD and transcribe as the file streams in.

A transcription of an hour used to hold the whole decoded hour (230 MB of float32), run VAD over all of it
at once and hand faster-whisper every chunk's features together, so its memory grew with the duration (an
hour of silence: ~880 MB). Here the decoder's blocks are gathered into windows of about
``SttOptions.window_s`` seconds; each window is cut at a pause that Silero VAD finds (the audio after the
cut is carried into the next window, so nothing is dropped and no word is split while a pause exists),
transcribed like any long audio (VAD-cut chunks through the batched pipeline), and its segments shifted to
absolute times. A window without speech is skipped. What one request holds is then about one window,
whatever the duration.

The language is detected once, on the first window with speech, and fixed for the rest; segments come in
order with times from the start of the file; the last ``SttInfo`` carries the whole duration.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from ..host.malloc import trim
from ..runtime.interfaces import Job, JobContext
from .stt import SttInfo, SttOptions, WhisperBackend, _check_budget

Timestamps = list[dict[str, int]]


def find_cut(speech: Timestamps, size: int) -> int:
    """Where to end a full window of ``size`` samples, given where VAD hears speech in it: after the last
    utterance that is over (its padded end), else before the utterance still running at the end; a window
    that is speech from start to end is cut at its end."""
    if not speech:
        return size
    last = speech[-1]
    if last["end"] < size:          # the window ends in a pause
        return last["end"]
    if len(speech) > 1:             # an utterance runs past the end: cut in the pause before it
        return speech[-2]["end"]
    return last["start"] if last["start"] > 0 else size


def windows(blocks: Iterable[np.ndarray], window: int, speech_of: Callable[[np.ndarray], Timestamps]
            ) -> Iterator[tuple[int, np.ndarray, Timestamps | None]]:
    """(offset in samples, samples, speech timestamps or None) per window, in order. Every window but the
    last holds at least ``window`` samples before its cut; the audio after a cut starts the next window."""
    pending: list[np.ndarray] = []
    held = 0
    offset = 0
    for block in blocks:
        pending.append(block)
        held += block.size
        if held < window:
            continue
        audio = np.concatenate(pending)
        speech = speech_of(audio)
        cut = find_cut(speech, audio.size)
        yield offset, audio[:cut], [s for s in speech if s["start"] < cut]
        rest = audio[cut:].copy()   # a copy: the window's buffer is freed, not kept alive by a view
        del audio
        pending, held, offset = [rest], rest.size, offset + cut
    if held:
        yield offset, np.concatenate(pending), None


def _shifted(segment: Any, seconds: float, frames: int, number: int) -> Any:
    words = segment.words and [dataclasses.replace(w, start=w.start + seconds, end=w.end + seconds)
                               for w in segment.words]
    return dataclasses.replace(segment, id=number, seek=segment.seek + frames, start=segment.start + seconds,
                               end=segment.end + seconds, words=words)


def transcribe_windows(backend: WhisperBackend, head: np.ndarray, rest: Iterable[np.ndarray], options: SttOptions,
                       ctx: JobContext | None = None) -> Iterator[SttInfo | Any]:
    """Like WhisperBackend.transcribe for audio longer than one window: ``head`` (the first window, decoded
    already) and then the decoder's remaining blocks. Yields SttInfo once the language is known, faster-whisper
    segments at absolute times, and a last SttInfo with the whole duration."""
    started = time.perf_counter()
    rate = backend.sample_rate
    vad = options.vad_filter is not False
    language, probability = options.language, 0.0
    tokens = number = 0
    announced = False
    end = 0

    def blocks() -> Iterator[np.ndarray]:
        yield head
        yield from rest

    for offset, audio, speech in windows(blocks(), int(options.window_s * rate), backend.speech_timestamps):
        end = offset + audio.size
        if ctx is not None and ctx.cancelled:
            return
        if vad and not (speech if speech is not None else backend.has_speech(audio)):
            trim()
            continue   # silence or noise: whisper would only hallucinate over it
        segments, info = backend.segments(audio, options, batched=vad, language=language)
        if language is None:
            language, probability = info.language, float(info.language_probability or 0.0)
        if not announced:
            yield SttInfo(language or "en", probability, end / rate)
            announced = True
        try:
            for segment in segments:
                if ctx is not None and ctx.cancelled:
                    return
                tokens += len(segment.tokens)
                number += 1
                shifted = _shifted(segment, offset / rate, offset // backend.model.feature_extractor.hop_length,
                                   number)
                _check_budget(options, started, tokens, shifted.end, end / rate)
                yield shifted
        finally:
            close = getattr(segments, "close", None)
            if close is not None:
                close()
        del audio, segments
        trim()   # a window's buffers go back to the system, not into malloc's free lists (flat RSS, not only heap)
    yield SttInfo(language or "en", probability, end / rate)


def transcription_job(head: np.ndarray, rest: Iterable[np.ndarray] | None, options: SttOptions) -> Job:
    """What a speech worker runs: ``head`` alone when the file ended within it (``rest`` is None), else windows
    as the rest decodes. A backend without VAD (the test kit's fake) gets the whole audio."""

    def run(backend: Any, ctx: JobContext) -> Iterator[Any]:
        if rest is None:
            yield from backend.transcribe(head, options, ctx)
        elif hasattr(backend, "speech_timestamps"):
            yield from transcribe_windows(backend, head, rest, options, ctx)
        else:
            yield from backend.transcribe(np.concatenate([head, *rest]), options, ctx)

    return Job(run)
