"""Speech-to-text with faster-whisper, fed by our decoder and our log-mel kernel."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from ..worker import JobContext

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

            return log_mel_spectrogram(waveform, self.mel_filters.shape[0], padding)

    extractor = KernelFeatureExtractor.__new__(KernelFeatureExtractor)
    extractor.__dict__.update(base.__dict__)
    return extractor


@dataclass(frozen=True)
class SttOptions:
    task: str = "transcribe"               # or "translate"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    word_timestamps: bool = False


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
        self.english_only = english_only or not self.model.model.is_multilingual
        self.sample_rate = self.model.feature_extractor.sampling_rate

    def transcribe(self, audio: np.ndarray, options: SttOptions, ctx: JobContext | None = None
                   ) -> Iterator[SttInfo | Any]:
        """Yields SttInfo first, then faster-whisper segments as they are decoded."""
        temperature: Any = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) if options.temperature is None else options.temperature
        segments, info = self.model.transcribe(
            audio, language=options.language, task=options.task, initial_prompt=options.prompt or None,
            temperature=temperature, word_timestamps=options.word_timestamps, beam_size=5,
            condition_on_previous_text=True, vad_filter=False)
        yield SttInfo(info.language, float(info.language_probability or 0.0), float(info.duration))
        try:
            for segment in segments:
                if ctx is not None and ctx.cancelled:
                    return
                yield segment
        finally:
            close = getattr(segments, "close", None)
            if close is not None:
                close()

    def close(self) -> None:
        self.model = None
