"""Speech requests for LocalEngine: validation, model choice, decoding outside the worker, responses."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from polargrid.types import (TranscriptionRequest, TranscriptionStreamDelta, TranscriptionStreamDone,
                             TranslationRequest)

from ..audio.decode import AudioInput, decode_audio
from ..audio.encode import CONTENT_TYPES, fix_wav_sizes
from ..errors import coerce, invalid
from ..registry import ModelSpec
from ..stream import Stream
from .formats import RESPONSE_FORMATS, TranscriptionWord, build_response, segment_of
from .stt import SttInfo, SttOptions
from .tts import parse_speech_request, speech_job

if TYPE_CHECKING:
    from ..engine import LocalEngine


MIN_SAMPLES = 400   # one log-mel window at 16 kHz (25 ms): the feature kernel needs at least this much


def _languages() -> tuple[str, ...]:
    """The language codes Whisper knows (an unknown one was a 500 from inside the worker)."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return _LANGUAGE_CODES


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


class SpeechService:
    """Text-to-speech and speech-to-text on the engine's model pool."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    # -- text to speech ------------------------------------------------------------------

    def speech_stream(self, request: Any, *, stream_default_format: str | None = None) -> Stream[bytes]:
        """Encoded audio, a piece per sentence as it is synthesised."""
        explicit = isinstance(request, dict) and "response_format" in request or (
            not isinstance(request, dict) and "response_format" in getattr(request, "model_fields_set", set()))
        request = parse_speech_request(request)
        fmt = _value(request.response_format).lower()
        if stream_default_format and not explicit:
            fmt = stream_default_format
        spec = self.engine.pool.resolve(request.model, "tts")
        stream = self.engine.open_stream(spec, speech_job(request, fmt), "speech",
                                         on_finish=lambda _s: self.engine.usage.record(spec.id, len(request.input)))
        stream.content_type = CONTENT_TYPES[fmt]
        return stream

    def speech(self, request: Any) -> bytes:
        """The whole clip: the fold of the stream (a wav header then gets its real sizes)."""
        with self.speech_stream(request) as stream:
            data = b"".join(stream)
        if stream.content_type == CONTENT_TYPES["wav"]:
            data = fix_wav_sizes(data)
        return data

    # -- speech to text ------------------------------------------------------------------

    def stt_model(self, name: str | None, task: str, language: str | None) -> ModelSpec:
        """The STT model for a request: an English-only model hands translation and other languages to its
        multilingual fallback (models.toml)."""
        spec = self.engine.pool.resolve(name or None, "stt")
        needs_multilingual = task == "translate" or (language not in (None, "", "en"))
        if needs_multilingual and spec.engine.get("english_only"):
            fallback = spec.engine.get("multilingual_fallback")
            fallback_spec = self.engine.registry.get(fallback) if fallback else None
            if fallback_spec is None:
                what = "translation" if task == "translate" else f"language {language!r}"
                raise invalid(f"Model {spec.id!r} is English-only and cannot do {what}; "
                              "choose a multilingual model", field="model")
            return fallback_spec
        return spec

    def parse_request(self, request: Any, task: str) -> tuple[Any, str, bool]:
        """The SDK request (object or dict), its response format, and whether word timings were asked for."""
        words = False
        if isinstance(request, dict):
            request = dict(request)
            granularities = request.pop("timestamp_granularities", None) or request.pop("timestamp_granularities[]",
                                                                                      None)
            if isinstance(granularities, str):
                granularities = [granularities]
            words = "word" in (granularities or [])
        cls = TranslationRequest if task == "translate" else TranscriptionRequest
        request = coerce(cls, request, f"{task} request")
        language = getattr(request, "language", None)
        if language and language not in _languages():
            raise invalid(f"Unknown language {language!r}; use an ISO-639-1 code such as 'en' or 'fr'",
                          field="language")
        fmt = _value(request.response_format or "json").lower()
        if fmt not in RESPONSE_FORMATS:
            raise invalid(f"Unsupported response_format {fmt!r}; choose one of: {', '.join(RESPONSE_FORMATS)}",
                          field="response_format")
        return request, fmt, words

    def _open(self, file: AudioInput, request: Any, task: str, words: bool, convert=lambda item: [item], tail=None):
        """Decode here (off the model's thread), then queue the transcription on the model's worker."""
        language = getattr(request, "language", None) or None
        spec = self.stt_model(_value(request.model) if request.model else None, task, language)
        decoded = decode_audio(file, 16000)
        options = SttOptions(task=task, language=language, prompt=request.prompt, temperature=request.temperature,
                             word_timestamps=words)
        audio = decoded.samples
        if audio.size < MIN_SAMPLES:  # a clip shorter than one analysis window is silence-padded, not a 500
            audio = np.pad(audio, (0, MIN_SAMPLES - audio.size))

        def job(backend, ctx):
            yield from backend.transcribe(audio, options, ctx)

        stream = self.engine.open_stream(spec, job, "transcription", convert, tail=tail)
        return spec, stream, decoded.duration

    def transcribe(self, file: AudioInput, request: Any, *, task: str = "transcribe", on_progress=None,
                   on_open=None):
        """Transcribe (or translate) a whole file into the requested response format. ``on_open`` gets the
        stream being folded as soon as it is open (the HTTP facade closes it when its client leaves)."""
        request, fmt, words = self.parse_request(request, task)
        spec, stream, duration = self._open(file, request, task, words)
        if on_open is not None:
            on_open(stream)
        info: SttInfo | None = None
        segments, word_list = [], []
        with stream:
            for item in stream:
                if isinstance(item, SttInfo):
                    info = item
                    continue
                segments.append(segment_of(item))
                word_list += [TranscriptionWord(word=w.word, start=round(w.start, 3), end=round(w.end, 3))
                              for w in (item.words or [])]
                if on_progress is not None and duration:
                    on_progress(min(1.0, item.end / duration))
        self.engine.usage.record(spec.id, sum(len(s.tokens) for s in segments))
        language = info.language if info else (request.language or "en")
        return build_response(fmt, task, language, info.duration if info else duration, segments,
                              word_list if words else None)

    def transcribe_stream(self, file: AudioInput, request: Any) -> Stream[Any]:
        """Delta events as segments are decoded, then one done event with the whole text."""
        request, _fmt, _words = self.parse_request(request, "transcribe")
        state = {"text": "", "language": request.language or "en", "duration": 0.0}

        def convert(item):
            if isinstance(item, SttInfo):
                state["language"], state["duration"] = item.language, item.duration
                return []
            piece = item.text if state["text"] else item.text.lstrip()
            state["text"] += piece
            return [TranscriptionStreamDelta(type="transcript.text.delta", delta=piece)]

        def done():
            return [TranscriptionStreamDone(type="transcript.text.done", text=state["text"],
                                            duration=round(state["duration"], 3), language=state["language"])]

        _spec, stream, duration = self._open(file, request, "transcribe", False, convert, done)
        state["duration"] = duration
        return stream
