"""Speech requests for LocalEngine: validation, model choice, decoding outside the worker, responses."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from polargrid.types import TranscriptionRequest, TranscriptionStreamDelta, TranscriptionStreamDone, TranslationRequest

from ..audio.decode import AudioInput, AudioReader
from ..audio.encode import CONTENT_TYPES, fix_wav_sizes
from ..errors import RateLimitError, coerce, invalid
from ..limits import DEFAULT_LIMITS, Limits
from ..remote.audio import RemoteAudio
from ..runtime.stream import Stream
from ..store.registry import ModelSpec
from .formats import RESPONSE_FORMATS, TranscriptionWord, build_response, segment_of
from .long_audio import transcription_job
from .stt import SttInfo, SttOptions
from .tts import parse_speech_request, speech_job

if TYPE_CHECKING:
    from ..engine import LocalEngine


MIN_SAMPLES = 400   # one log-mel window at 16 kHz (25 ms): the feature kernel needs at least this much


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


class SpeechService:
    """Text-to-speech and speech-to-text on the engine's model pool."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self.remote = RemoteAudio(engine)

    @property
    def limits(self) -> Limits:
        return getattr(self.engine, "limits", None) or DEFAULT_LIMITS

    def guard_queue(self, spec: ModelSpec) -> None:
        """RateLimitError (429) once the model has max_speech_queue requests waiting or running."""
        limit = self.limits.max_speech_queue
        depth = self.engine.pool.queue_depth(spec)
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
        return self.engine.router.run(self.engine.pool.resolve(request.model, "tts"),
                                      lambda spec: self._speech_stream(spec, request, fmt),
                                      lambda spec: self.remote.speech_stream(spec, request, fmt))

    def _speech_stream(self, spec: ModelSpec, request: Any, fmt: str) -> Stream[bytes]:
        self.guard_queue(spec)
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

    def _model_for(self, request: Any, task: str) -> ModelSpec:
        language = (getattr(request, "language", None) or "").lower() or None
        return self.stt_model(_value(request.model) if request.model else None, task, language)

    def _open(self, spec: ModelSpec, file: AudioInput, request: Any, task: str, words: bool, vad: bool | None,
              convert=lambda item: [item], tail=None):
        """Decode the start here (off the model's thread), route by language, then queue the transcription on the
        model's worker; audio longer than one window decodes the rest there, as it is transcribed."""
        language = (getattr(request, "language", None) or "").lower() or None
        self.guard_queue(spec)
        limits = self.limits
        reader = AudioReader(file, 16000, limits=limits)   # long audio: the rest decodes as it is transcribed
        audio, rest = reader.head(limits.transcription_window_s)
        duration = audio.size / 16000 if rest is None else max(reader.declared_seconds or 0.0, audio.size / 16000)
        if audio.size < MIN_SAMPLES:  # a clip shorter than one analysis window is silence-padded, not a 500
            audio = np.pad(audio, (0, MIN_SAMPLES - audio.size))
        if task == "transcribe" and language is None:
            spec, language = self._route_by_language(spec, audio)
        options = SttOptions(task=task, language=language, prompt=request.prompt, temperature=request.temperature,
                             word_timestamps=words, vad_filter=vad,
                             time_budget_s=limits.transcription_seconds_base
                             + limits.transcription_seconds_per_audio_second * duration,
                             token_budget=int(limits.transcription_tokens_base
                                              + limits.transcription_tokens_per_audio_second * duration),
                             batch_size=int(spec.engine.get("batch_size", 8)), budget_audio_s=duration,
                             time_per_audio_s=limits.transcription_seconds_per_audio_second,
                             tokens_per_audio_s=limits.transcription_tokens_per_audio_second,
                             window_s=limits.transcription_window_s)

        stream = self.engine.open_stream(spec, transcription_job(audio, rest, options), "transcription", convert,
                                         tail=tail)
        return spec, stream, duration

    def _route_by_language(self, spec: ModelSpec, audio) -> tuple[ModelSpec, str | None]:
        """An English-only model with a multilingual fallback (whisper-1) serves only English speech: the
        fallback detects the language of the first 30 s; other languages are transcribed by the fallback."""
        fallback = spec.engine.get("multilingual_fallback") if spec.engine.get("english_only") else None
        fallback_spec = self.engine.registry.get(fallback) if fallback else None
        if fallback_spec is None:
            return spec, None
        self.guard_queue(fallback_spec)

        def detect(backend, _ctx):
            yield backend.detect_language(audio)

        with self.engine.open_stream(fallback_spec, detect, "language detection") as stream:
            language, _probability = next(stream)
        return (spec if language == "en" else fallback_spec), language

    def transcribe(self, file: AudioInput, request: Any, *, task: str = "transcribe", on_progress=None,
                   on_open=None):
        """Transcribe (or translate) a whole file into the requested response format. ``on_open`` gets the
        stream being folded as soon as it is open (the HTTP facade closes it when its client leaves)."""
        request, fmt, words, vad = self.parse_request(request, task)
        return self.engine.router.run(
            self._model_for(request, task),
            lambda spec: self._transcribe(spec, file, request, fmt, words, vad, task, on_progress, on_open),
            lambda spec: self.remote.transcribe(spec, file, request, fmt, words, task))

    def _transcribe(self, spec: ModelSpec, file: AudioInput, request: Any, fmt: str, words: bool,
                    vad: bool | None, task: str, on_progress, on_open):
        spec, stream, duration = self._open(spec, file, request, task, words, vad)
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

        spec = self._model_for(request, "transcribe")
        if spec.remote is not None:
            raise invalid(f"streamed transcription is not forwarded to remote models; call transcribe() on "
                          f"{spec.id!r}, or stream from a local model", field="stream")
        _spec, stream, duration = self._open(spec, file, request, "transcribe", False, vad, convert, done)
        state["duration"] = duration
        return stream


def check_language(language: str | None) -> None:
    """A transcription language must be one of whisper's ISO-639-1 codes."""
    if not language:
        return
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
