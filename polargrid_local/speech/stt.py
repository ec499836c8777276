"""Speech-to-text with faster-whisper, fed by our decoder and our log-mel kernel."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..runtime.compute import OnLane, on_lane
from ..runtime.interfaces import JobContext

logger = logging.getLogger("polargrid_local")


def _kernel_feature_extractor(base):
    """faster-whisper's FeatureExtractor with its __call__ replaced by polargrid_local's kernel."""
    from faster_whisper.feature_extractor import FeatureExtractor

    class KernelFeatureExtractor(FeatureExtractor):
        def __call__(self, waveform: np.ndarray, padding: int = 160, chunk_length: int | None = None):
            if chunk_length is not None:
                self.n_samples = chunk_length * self.sampling_rate
                self.nb_max_frames = self.n_samples // self.hop_length
            from ..kernels import log_mel_spectrogram  # numba: loaded with the first STT model

            return on_lane(log_mel_spectrogram, waveform, self.mel_filters.shape[0], padding)

    extractor = KernelFeatureExtractor.__new__(KernelFeatureExtractor)
    extractor.__dict__.update(base.__dict__)
    return extractor


LONG_AUDIO_SECONDS = 30.0      # past one whisper window: VAD-cut chunks, decoded in batches
DETECTION_SECONDS = 30           # language detection looks at the first window only


@dataclass(frozen=True)
class SttOptions:
    task: str = "transcribe"               # or "translate"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = False
    vad_filter: bool | None = None         # None: gate short audio on speech, VAD-cut long audio
    time_budget_s: float = float("inf")    # from when the worker starts the job, for budget_audio_s of audio
    token_budget: int = 1 << 30
    batch_size: int = 8
    # Long audio decoded as it is transcribed: the budgets grow by these per second of audio past budget_audio_s.
    time_per_audio_s: float = 0.0
    tokens_per_audio_s: float = 0.0
    budget_audio_s: float = 0.0
    window_s: float = 120.0                # long audio is decoded, VAD-cut and transcribed in windows this long

    def budgets(self, audio_s: float) -> tuple[float, int]:
        """(seconds, tokens) a transcription may spend once ``audio_s`` seconds of audio are known."""
        extra = max(0.0, audio_s - self.budget_audio_s)
        return self.time_budget_s + self.time_per_audio_s * extra, self.token_budget + int(
            self.tokens_per_audio_s * extra)


@dataclass(frozen=True)
class SttInfo:
    """Known before the first segment: the language and the audio's duration."""

    language: str
    language_probability: float
    duration: float


class WhisperBackend:
    """A faster-whisper model (CTranslate2) on the CPU or a CUDA device."""

    def __init__(self, path: str, *, device: str = "cpu", compute_type: str = "int8", cpu_threads: int = 0,
                 english_only: bool = False) -> None:
        from faster_whisper import WhisperModel

        self.model = WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=cpu_threads)
        self.model.feature_extractor = _kernel_feature_extractor(self.model.feature_extractor)
        # CTranslate2's calls (each a window of audio) take turns with the other models' work on the compute lane
        self.model.model = OnLane(self.model.model, ("encode", "generate", "detect_language", "align"))
        self.english_only = english_only or not self.model.model.is_multilingual
        self.sample_rate = self.model.feature_extractor.sampling_rate
        self._batched = None

    def detect_language(self, audio: np.ndarray) -> tuple[str, float]:
        """The spoken language of the first 30 s and its probability (multilingual models)."""
        if self.english_only:
            return "en", 1.0
        language, probability, _all = self.model.detect_language(audio[: DETECTION_SECONDS * self.sample_rate])
        return language, float(probability)

    def has_speech(self, audio: np.ndarray) -> bool:
        """Whether Silero VAD (bundled with faster-whisper) hears any speech."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        return bool(get_speech_timestamps(audio, VadOptions(), sampling_rate=self.sample_rate))

    def transcribe(self, audio: np.ndarray, options: SttOptions, ctx: JobContext | None = None
                   ) -> Iterator[SttInfo | Any]:
        """Yields SttInfo first, then faster-whisper segments as they are decoded.

        Audio with no speech in it (silence, noise) gives no segments rather than whisper's
        hallucinated "Thank you."; long audio is cut at pauses by VAD and decoded in batches.
        Past its time or token budget a transcription ends with the SDK's TimeoutError.
        """
        started = time.perf_counter()
        duration = audio.size / self.sample_rate
        long_audio = duration > LONG_AUDIO_SECONDS
        if options.vad_filter is not False and not self.has_speech(audio):
            yield SttInfo(options.language or "en", 0.0, duration)
            return
        segments, info = self.segments(audio, options, batched=long_audio and options.vad_filter is not False)
        yield SttInfo(info.language, float(info.language_probability or 0.0), float(info.duration))
        tokens = 0
        try:
            for segment in segments:
                if ctx is not None and ctx.cancelled:
                    return
                tokens += len(segment.tokens)
                _check_budget(options, started, tokens, segment.end)
                yield segment
        finally:
            close = getattr(segments, "close", None)
            if close is not None:
                close()

    def segments(self, audio: np.ndarray, options: SttOptions, *, batched: bool, language: str | None = None):
        """faster-whisper's (segments, info) for ``audio``: the batched pipeline (VAD-cut chunks) or the
        sequential decoder; ``language`` (else the request's, else detected) fixes the language."""
        temperature: Any = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if options.temperature is None else options.temperature
        common = dict(language=language or options.language, task=options.task, initial_prompt=options.prompt or None,
                      temperature=temperature, word_timestamps=options.word_timestamps, beam_size=5)
        if batched:
            return self._batched_pipeline().transcribe(audio, vad_filter=True, batch_size=options.batch_size,
                                                       **common)
        return self.model.transcribe(audio, condition_on_previous_text=True, vad_filter=bool(options.vad_filter),
                                     **common)

    def speech_timestamps(self, audio: np.ndarray, min_silence_ms: int = 500) -> list[dict[str, int]]:
        """Where Silero VAD hears speech: [{"start": sample, "end": sample}, ...], pauses of at least
        ``min_silence_ms`` between them."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        return get_speech_timestamps(audio, VadOptions(min_silence_duration_ms=min_silence_ms),
                                     sampling_rate=self.sample_rate)

    def _batched_pipeline(self):
        if self._batched is None:
            from faster_whisper import BatchedInferencePipeline

            self._batched = BatchedInferencePipeline(self.model)
        return self._batched

    def close(self) -> None:
        self.model = self._batched = None


def _check_budget(options: SttOptions, started: float, tokens: int, position: float, audio_s: float = 0.0) -> None:
    from polargrid import errors as sdk

    time_budget, token_budget = options.budgets(audio_s)
    spent = time.perf_counter() - started
    if spent > time_budget:
        raise sdk.TimeoutError(f"Transcription stopped at {position:.1f} s of audio: it ran past its time budget of "
                               f"{time_budget:.0f} s (Limits.transcription_seconds_*)")
    if tokens > token_budget:
        raise sdk.TimeoutError(f"Transcription stopped at {position:.1f} s of audio: it produced {tokens} tokens, "
                               f"past its budget of {token_budget} (Limits.transcription_tokens_*)")
