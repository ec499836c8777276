"""Speech requests for LocalEngine: validation, model choice, decoding outside the worker, calls."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from polargrid.types import TranscriptionRequest, TranscriptionStreamDelta, TranscriptionStreamDone, TranslationRequest

from ..audio.decode import AudioInput
from ..errors import RateLimitError, coerce, invalid
from ..limits import DEFAULT_LIMITS, Limits
from ..runtime.fallback import Router
from ..runtime.pool import ModelPool
from ..runtime.stream import Stream
from ..store.registry import ModelSpec
from .calls import Audio, DetectionCall, SpeechCall, TranscriptionCall, decode_speech
from .formats import RESPONSE_FORMATS
from .stt import SttInfo
from .tts import parse_speech_request


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


class SpeechService:
    """Text-to-speech and speech-to-text: validation, model choice (language routing, fallbacks), calls opened
    through ``open(spec, call)`` (the engine's one way to run a request on a model)."""

    def __init__(self, pool: ModelPool, open: Callable[[ModelSpec, Any], Stream[Any]], router: Router,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        self.pool = pool
        self.open = open
        self.router = router
        self.limits = limits

    def guard_queue(self, spec: ModelSpec) -> None:
        """RateLimitError (429) once the model has max_speech_queue requests waiting or running."""
        limit = self.limits.max_speech_queue
        depth = self.pool.queue_depth(spec)
        if depth >= limit:
            raise RateLimitError(f"Speech model {spec.id!r} has {depth} requests queued (the limit is {limit}, "
                                 "Limits.max_speech_queue); retry shortly", retry_after=2)

    # -- text to speech ------------------------------------------------------------------

    def speech_stream(self, request: Any, *, stream_default_format: str | None = None) -> Stream[bytes]:
        """Encoded audio, a piece per sentence as it is synthesised."""
        explicit = isinstance(request, dict) and "response_format" in request or (
            not isinstance(request, dict) and "response_format" in getattr(request, "model_fields_set", set()))
        request = parse_speech_request(request)
        fmt = _value(request.response_format).lower()
        if stream_default_format and not explicit:
            fmt = stream_default_format
        call = SpeechCall(request, fmt)
        return self.router.run(self.pool.resolve(request.model, "tts"), lambda spec: self._open(spec, call))

    def _open(self, spec: ModelSpec, call: Any) -> Stream[Any]:
        if not self.pool.forwards(spec):
            self.guard_queue(spec)
        return self.open(spec, call)

    def speech(self, request: Any) -> bytes:
        """The whole clip: the fold of the stream."""
        with self.speech_stream(request) as stream:
            return stream.fold(list(stream))

    # -- speech to text ------------------------------------------------------------------

    def stt_model(self, name: str | None, task: str, language: str | None) -> ModelSpec:
        """The STT model for a request: an English-only model hands translation and other languages to its
        multilingual fallback (models.toml)."""
        spec = self.pool.resolve(name or None, "stt")
        needs_multilingual = task == "translate" or (language not in (None, "", "en"))
        if needs_multilingual and spec.engine.get("english_only"):
            fallback = spec.engine.get("multilingual_fallback")
            fallback_spec = self.pool.registry.get(fallback) if fallback else None
            if fallback_spec is None:
                what = "translation" if task == "translate" else f"language {language!r}"
                raise invalid(f"Model {spec.id!r} is English-only and cannot do {what}; "
                              "choose a multilingual model", field="model")
            return fallback_spec
        return spec

    def parse_request(self, request: Any, task: str) -> tuple[Any, str, bool, bool | None]:
        """The SDK request (object or dict), its response format, whether word timings were asked for, and
        the local extra ``vad_filter`` (True, False, or None for the default)."""
        words = False
        vad: Any = getattr(request, "vad_filter", None)
        if isinstance(request, dict):
            request = dict(request)
            granularities = request.pop("timestamp_granularities", None) or request.pop("timestamp_granularities[]",
                                                                                      None)
            if isinstance(granularities, str):
                granularities = [granularities]
            words = "word" in (granularities or [])
            vad = request.pop("vad_filter", None)
        cls = TranslationRequest if task == "translate" else TranscriptionRequest
        request = coerce(cls, request, f"{task} request")
        fmt = _value(request.response_format or "json").lower()
        if fmt not in RESPONSE_FORMATS:
            raise invalid(f"Unsupported response_format {fmt!r}; choose one of: {', '.join(RESPONSE_FORMATS)}",
                          field="response_format")
        check_language(getattr(request, "language", None))
        if request.prompt and "\0" in request.prompt:
            raise invalid("prompt must not contain NUL characters", field="prompt")
        return request, fmt, words, parse_vad_filter(vad)

    def check_transcription(self, request: dict[str, Any]) -> None:
        """Refuse a transcription job now (bad fields, or its model's queue is full), before it is accepted."""
        self.parse_request(request, "transcribe")
        self.guard_queue(self.stt_model(request.get("model"), "transcribe", request.get("language")))

    def _model_for(self, request: Any, task: str) -> ModelSpec:
        language = (getattr(request, "language", None) or "").lower() or None
        return self.stt_model(_value(request.model) if request.model else None, task, language)

    def _open_transcription(self, spec: ModelSpec, call: TranscriptionCall) -> Stream[Any]:
        """Forwarded as is to a remote; for a model here, decoded first (off the model's thread) and routed by
        the language it speaks."""
        if self.pool.forwards(spec):
            return self.open(spec, call)
        self.guard_queue(spec)
        audio = call.audio or decode_speech(call.file, self.limits)
        language = (getattr(call.request, "language", None) or "").lower() or None
        if call.task == "transcribe" and language is None:
            spec, language = self._route_by_language(spec, audio)
        call = dataclasses.replace(call, audio=audio, language=language,
                                   batch_size=int(spec.engine.get("batch_size", 8)))
        return self.open(spec, call)

    def _route_by_language(self, spec: ModelSpec, audio: Audio) -> tuple[ModelSpec, str | None]:
        """An English-only model with a multilingual fallback (whisper-1) serves only English speech: the
        fallback detects the language of the first 30 s; other languages are transcribed by the fallback."""
        fallback = spec.engine.get("multilingual_fallback") if spec.engine.get("english_only") else None
        fallback_spec = self.pool.registry.get(fallback) if fallback else None
        if fallback_spec is None or self.pool.forwards(fallback_spec):
            return spec, None
        self.guard_queue(fallback_spec)
        with self.open(fallback_spec, DetectionCall(audio)) as stream:
            language, _probability = next(stream)
        return (spec if language == "en" else fallback_spec), language

    def transcribe(self, file: AudioInput, request: Any, *, task: str = "transcribe", on_progress=None,
                   on_open=None):
        """Transcribe (or translate) a whole file into the requested response format. ``on_open`` gets the
        stream being folded as soon as it is open (the HTTP facade closes it when its client leaves)."""
        request, fmt, words, vad = self.parse_request(request, task)
        call = TranscriptionCall(file, request, fmt, words, vad, task, self.limits)
        return self.router.run(self._model_for(request, task),
                               lambda spec: self._transcribe(spec, call, on_progress, on_open))

    def _transcribe(self, spec: ModelSpec, call: TranscriptionCall, on_progress, on_open):
        stream = self._open_transcription(spec, call)
        if on_open is not None:
            on_open(stream)
        items, duration = [], 0.0
        with stream:
            for item in stream:
                items.append(item)
                if isinstance(item, SttInfo):
                    duration = item.duration
                elif on_progress is not None and duration and getattr(item, "end", None) is not None:
                    on_progress(min(1.0, item.end / duration))
        return stream.fold(items)

    def transcribe_stream(self, file: AudioInput, request: Any) -> Stream[Any]:
        """Delta events as segments are decoded, then one done event with the whole text."""
        request, _fmt, _words, vad = self.parse_request(request, "transcribe")
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

        call = TranscriptionCall(file, request, "json", False, vad, "transcribe", self.limits, convert=convert,
                                 tail=done)
        spec = self._model_for(request, "transcribe")
        if not self.pool.forwards(spec):
            audio = decode_speech(file, self.limits)
            call = dataclasses.replace(call, audio=audio)
            state["duration"] = audio.duration
        return self._open_transcription(spec, call)


def check_language(language: str | None) -> None:
    """A transcription language must be one of whisper's ISO-639-1 codes."""
    if not language:
        return
    from ..host.openmp import import_ctranslate2

    import_ctranslate2()   # before faster_whisper imports it: see host/openmp.py
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    if not isinstance(language, str) or language.lower() not in _LANGUAGE_CODES:
        raise invalid(f"Unknown language {language!r}: use an ISO-639-1 code whisper knows, such as "
                      "'en', 'fr', 'de', 'es', 'zh' (or leave it out to detect the language)", field="language")


def parse_vad_filter(value: Any) -> bool | None:
    """The request's vad_filter: True, False, or None for the default (a form field arrives as text)."""
    if value is None or value == "" or isinstance(value, bool):
        return value if isinstance(value, bool) else None
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    if text == "auto":
        return None
    raise invalid(f"vad_filter must be true, false or auto, not {value!r}", field="vad_filter")
