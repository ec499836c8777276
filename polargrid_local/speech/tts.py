"""Text-to-speech on piper voices: sentences synthesised in order, resampled and encoded as they come."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from polargrid.types import TextToSpeechRequest

from ..audio.encode import FORMATS, StreamEncoder
from ..errors import check_text, invalid
from ..runtime.compute import OnLane, on_lane
from ..runtime.interfaces import Job, JobContext

MAX_INPUT = 4096


class SpeechRequest(TextToSpeechRequest):
    """The SDK's TextToSpeechRequest, with any registry model name allowed (the SDK lists only its own)."""

    model: str
    input: str
    speed: float = 1.0


class PiperBackend:
    """A loaded piper voice (ONNX) and the voice names that map to its speakers."""

    def __init__(self, path: str, voices: dict[str, int] | None = None, output_sample_rate: int = 24000,
                 use_cuda: bool = False) -> None:
        from piper import PiperVoice

        self.voice: Any = PiperVoice.load(path, use_cuda=use_cuda)
        self.voice.session = OnLane(self.voice.session, ("run",))   # onnxruntime's runs take turns on the lane
        self.sample_rate = self.voice.config.sample_rate
        self.output_sample_rate = output_sample_rate
        self.voices = {k.lower(): int(v) for k, v in (voices or {"default": 0}).items()}

    def speaker(self, voice: str) -> int:
        try:
            return self.voices[voice.lower()]
        except KeyError:
            raise invalid(f"Unknown voice {voice!r}; available voices: {', '.join(sorted(self.voices))}",
                          field="voice") from None

    def synthesize(self, text: str, speed: float, speaker: int, cancelled=lambda: False) -> Iterator[np.ndarray]:
        """Float32 mono audio at the voice's own rate, one array per sentence, ``speed`` times faster.

        Piper's length_scale does not scale duration proportionally (phoneme durations are rounded
        up to whole frames: 0.5 gave 0.62x here), so speech is made at its natural pace and then
        time-stretched, pitch preserved, to exactly 1/speed of its length.
        """
        from piper import SynthesisConfig

        from ..kernels.timestretch import time_stretch  # numba: loaded with the first TTS model

        config = SynthesisConfig(speaker_id=speaker if self.voice.config.num_speakers > 1 else None)
        for chunk in self.voice.synthesize(text, syn_config=config):
            if cancelled():
                return
            audio = chunk.audio_float_array
            yield audio if speed == 1.0 else time_stretch(audio, speed, self.sample_rate)

    def close(self) -> None:
        self.voice = None


def parse_speech_request(request: Any) -> SpeechRequest:
    from ..errors import coerce

    if isinstance(request, TextToSpeechRequest) and not isinstance(request, SpeechRequest):
        request = request.model_dump()
    request = coerce(SpeechRequest, request, "speech request")
    if not request.input or not request.input.strip():
        raise invalid("Input text is required", field="input")
    if "\0" in request.input:
        raise invalid("Input text must not contain NUL characters", field="input")
    check_text(request.input, "input")
    if len(request.input) > MAX_INPUT:
        raise invalid(f"Input text must be {MAX_INPUT} characters or less (got {len(request.input)})", field="input")
    if not request.voice:
        raise invalid("Voice is required", field="voice")
    if not 0.25 <= request.speed <= 4.0:
        raise invalid("Speed must be between 0.25 and 4.0", field="speed")
    fmt = _value(request.response_format).lower()
    if fmt not in FORMATS:
        raise invalid(f"Unsupported response_format {fmt!r}; choose one of: {', '.join(FORMATS)}",
                      field="response_format")
    return request


def _value(v: Any) -> str:
    return str(getattr(v, "value", v))


def speech_job(request: SpeechRequest, fmt: str) -> Job:
    """The worker job: yields encoded bytes as each sentence is ready."""
    voice_name = _value(request.voice)

    def run(backend: PiperBackend, ctx: JobContext) -> Iterator[bytes]:
        speaker = backend.speaker(voice_name)
        rate = backend.output_sample_rate
        from ..kernels.resample import Resampler

        resampler = Resampler(backend.sample_rate, rate)
        encoder = StreamEncoder(fmt, rate)
        for sentence in backend.synthesize(request.input, request.speed, speaker, lambda: ctx.cancelled):
            data = encoder.feed(on_lane(resampler.process, sentence))
            if data:
                yield data
        tail = encoder.feed(on_lane(resampler.flush)) + encoder.close()
        if tail:
            yield tail

    return Job(run)
