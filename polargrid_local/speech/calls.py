"""Speech requests as calls (runtime/interfaces.py): run by a speech model here, or forwarded to a remote."""
from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from polargrid import errors as sdk
from polargrid.types import TranscriptionResponse, TranslationResponse

from ..audio.decode import AudioInput, AudioReader
from ..audio.encode import CONTENT_TYPES, fix_wav_sizes
from ..limits import Limits
from ..remote.forward import Forward, forwarded_fields, json_object
from ..runtime.interfaces import Job, Prepared
from .formats import TranscriptionWord, VerboseTranscriptionResponse, build_response, segment_of
from .long_audio import transcription_job
from .stt import SttInfo, SttOptions
from .tts import speech_job

MIN_SAMPLES = 400   # one log-mel window at 16 kHz (25 ms): the feature kernel needs at least this much


class _Items:
    """A reader that hands each item on as it is."""

    def feed(self, item: Any) -> list[Any]:
        return [item]


def _first(items: list[Any], metadata: Any) -> Any:
    return items[0]


class SpeechCall:
    """Text to speech: encoded audio in ``fmt``, a piece per sentence (or as the remote sends it)."""

    what = "speech"

    def __init__(self, request: Any, fmt: str) -> None:
        self.request, self.fmt = request, fmt

    def _prepared(self, work: Any) -> Prepared:
        return Prepared(work, _Items(), self._fold, lambda: len(self.request.input),
                        content_type=CONTENT_TYPES[self.fmt])

    def local(self, model_id: str) -> Prepared:
        return self._prepared(speech_job(self.request, self.fmt))

    def remote(self) -> Prepared:
        return self._prepared(Forward("audio/speech", {**forwarded_fields(self.request), "response_format": self.fmt},
                                      reply="bytes"))

    def _fold(self, items: list[bytes], metadata: Any) -> bytes:
        """The whole clip (a wav header then gets its real sizes)."""
        data = b"".join(items)
        return fix_wav_sizes(data) if self.fmt == "wav" else data


@dataclasses.dataclass(frozen=True)
class Audio:
    """Speech opened for transcription: its first window decoded (mono 16 kHz float32 ``samples``), the rest
    still to decode as it is transcribed (``rest``: None when the file ended within the window), and the
    duration known so far (the container's, when it says)."""

    samples: np.ndarray
    duration: float
    rest: Iterable[np.ndarray] | None = None


def decode_speech(file: AudioInput, limits: Limits) -> Audio:
    """Open and decode the first window here (off the model's thread: most bad files are a 400 before any queue),
    padding a clip shorter than one analysis window; long audio decodes the rest as it is transcribed."""
    reader = AudioReader(file, 16000, limits=limits)
    samples, rest = reader.head(limits.transcription_window_s)
    duration = samples.size / 16000 if rest is None else max(reader.declared_seconds or 0.0, samples.size / 16000)
    if samples.size < MIN_SAMPLES:  # silence-padded, not a 500
        samples = np.pad(samples, (0, MIN_SAMPLES - samples.size))
    return Audio(samples, duration, rest)


class _Transcript:
    """The local engine's items (SttInfo, then segments) handed on, or as stream events with ``convert``;
    counts the tokens of the segments it sees."""

    def __init__(self, convert: Callable[[Any], list[Any]] | None) -> None:
        self.convert = convert
        self.tokens = 0

    def feed(self, item: Any) -> list[Any]:
        if not isinstance(item, SttInfo):
            self.tokens += len(getattr(item, "tokens", ()) or ())
        return self.convert(item) if self.convert is not None else [item]


@dataclasses.dataclass(frozen=True)
class TranscriptionCall:
    """Speech to text (``task`` transcribe or translate) in response format ``fmt``.

    For a local model the service decodes the audio first (``audio``) and settles the ``language`` (it may
    detect it); ``convert`` and ``tail`` turn the engine's items into stream events (transcribe_stream).
    """

    file: AudioInput
    request: Any
    fmt: str
    words: bool
    vad: bool | None
    task: str
    limits: Limits
    audio: Audio | None = None
    language: str | None = None
    batch_size: int = 8
    convert: Callable[[Any], list[Any]] | None = None
    tail: Callable[[], list[Any]] | None = None

    what = "transcription"

    def local(self, model_id: str) -> Prepared:
        audio = self.audio or decode_speech(self.file, self.limits)
        limits, duration = self.limits, audio.duration
        options = SttOptions(task=self.task, language=self.language, prompt=self.request.prompt,
                             temperature=self.request.temperature, word_timestamps=self.words, vad_filter=self.vad,
                             time_budget_s=limits.transcription_seconds_base
                             + limits.transcription_seconds_per_audio_second * duration,
                             token_budget=int(limits.transcription_tokens_base
                                              + limits.transcription_tokens_per_audio_second * duration),
                             batch_size=self.batch_size, budget_audio_s=duration,
                             time_per_audio_s=limits.transcription_seconds_per_audio_second,
                             tokens_per_audio_s=limits.transcription_tokens_per_audio_second,
                             window_s=limits.transcription_window_s)
        reader = _Transcript(self.convert)
        return Prepared(transcription_job(audio.samples, audio.rest, options), reader, self._fold_local(duration),
                        lambda: reader.tokens, tail=self.tail)

    def _fold_local(self, duration: float) -> Callable[[list[Any], Any], Any]:
        def fold(items: list[Any], metadata: Any) -> Any:
            infos = [item for item in items if isinstance(item, SttInfo)]
            info = infos[-1] if infos else None   # long audio: the last one has the whole duration
            segments, words = [], []
            for item in items:
                if isinstance(item, SttInfo):
                    continue
                segments.append(segment_of(item))
                words += [TranscriptionWord(word=w.word, start=round(w.start, 3), end=round(w.end, 3))
                          for w in (item.words or [])]
            language = info.language if info else (self.request.language or "en")
            return build_response(self.fmt, self.task, language, info.duration if info else duration, segments,
                                  words if self.words else None)
        return fold

    def remote(self) -> Prepared:
        if self.convert is not None:
            raise sdk.ValidationError("streamed transcription is not forwarded to remote models; call transcribe() "
                                      "on this model, or stream from a local model", details={"field": "stream"})
        name, data = upload(self.file)
        fields = {**forwarded_fields(self.request), "response_format": self.fmt}
        form: dict[str, Any] = {k: str(v) for k, v in fields.items() if not isinstance(v, (list, dict))}
        if self.words:
            form["timestamp_granularities[]"] = ["word"]
        path = "audio/translations" if self.task == "translate" else "audio/transcriptions"
        forward = Forward(path, form=form, files={"file": (name, io.BytesIO(data))}, reply="body",
                          expects=("text/",) if self.fmt in TEXT_FORMATS else ("application/json",))
        return Prepared(forward, _RemoteTranscript(self.fmt, self.task, forward), _first)


TEXT_FORMATS = ("text", "srt", "vtt")   # transcripts answered as text/plain, not JSON


class _RemoteTranscript:
    """A remote's transcript body in the requested response format."""

    def __init__(self, fmt: str, task: str, forward: Forward) -> None:
        self.fmt, self.task, self.forward = fmt, task, forward

    def feed(self, body: bytes) -> list[Any]:
        if self.fmt in TEXT_FORMATS:
            return [body.decode("utf-8", "replace")]
        data = json_object(body, self.forward)   # no NaN or Infinity to pass on
        try:
            if self.fmt == "verbose_json":
                return [VerboseTranscriptionResponse.model_validate(data)]
            cls = TranslationResponse if self.task == "translate" else TranscriptionResponse
            return [cls.model_validate(data)]
        except pydantic.ValidationError as exc:
            raise sdk.ServerError(f"remote {self.forward.where} sent a transcript that is not OpenAI-compatible: "
                                  f"{exc.errors()[0].get('msg')}", 502) from exc


def upload(file: Any) -> tuple[str, bytes]:
    """(file name, bytes) of any audio input the local path accepts: a path, bytes or a file object."""
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return path.name, path.read_bytes()
    if isinstance(file, (bytes, bytearray, memoryview)):
        return getattr(file, "name", None) or "audio", bytes(file)
    data = file.read()
    if hasattr(file, "seek"):
        file.seek(0)  # a fallback to a local model reads it again
    return Path(getattr(file, "name", None) or "audio").name, data


class DetectionCall:
    """The language of the first 30 s of decoded speech, as (code, probability); local models only."""

    what = "language detection"

    def __init__(self, audio: Audio) -> None:
        self.audio = audio

    def local(self, model_id: str) -> Prepared:
        samples = self.audio.samples

        def run(backend: Any, ctx: Any):
            yield backend.detect_language(samples)

        return Prepared(Job(run), _Items(), _first, counted=False)

    def remote(self) -> Prepared:
        raise sdk.ServerError("language detection runs on local speech models only", 501)
