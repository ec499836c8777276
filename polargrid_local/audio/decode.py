"""Any audio PyAV can read (wav, mp3, m4a, ogg, flac, webm...) to mono float32 at the rate a model wants.

Decoding streams: frames are mixed to mono and resampled as they come, so the whole file at its
original rate and channel count is never held in memory. What a file may cost is bounded before and
while decoding (limits.py): its declared duration and sample rate are checked from the container
first, the output goes into one float32 buffer that never grows past ``max_audio_seconds``, and
samples that are not finite (NaN, Inf: whisper loops on them for minutes) are refused.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from ..errors import PolarGridError, invalid
from ..limits import DEFAULT_LIMITS, Limits
from ..runtime.compute import on_lane

AudioInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

_SAMPLE_TYPES = {"s16": np.int16, "s16p": np.int16, "s32": np.int32, "s32p": np.int32, "flt": np.float32,
                 "fltp": np.float32, "dbl": np.float64, "dblp": np.float64, "u8": np.uint8, "u8p": np.uint8}
_FIRST_GUESS_SECONDS = 120.0  # buffer size when the container does not say how long it is


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray      # mono float32 at sample_rate
    sample_rate: int
    source_rate: int
    source_channels: int
    codec: str

    @property
    def duration(self) -> float:
        return self.samples.size / self.sample_rate


def _open_source(source: AudioInput) -> tuple[BinaryIO | str, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not len(source):
            raise invalid("The audio file is empty", field="file")
        return io.BytesIO(bytes(source)), "audio"
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise invalid(f"Audio file not found: {path}", field="file")
        if path.stat().st_size == 0:
            raise invalid(f"The audio file {path.name} is empty", field="file")
        return str(path), path.name
    if hasattr(source, "read"):
        name = Path(getattr(source, "name", "audio") or "audio").name
        return source, name
    raise invalid(f"file must be a path, bytes or a binary file object, not {type(source).__name__}", field="file")


class _Output:
    """The decoded samples: one float32 buffer, grown geometrically, never past ``limit`` samples."""

    def __init__(self, expected: int, limit: int, refuse) -> None:
        self.limit, self.refuse = limit, refuse
        self.buffer = np.empty(max(1, min(expected, limit)), np.float32)
        self.size = 0

    def add(self, samples: np.ndarray) -> None:
        end = self.size + samples.size
        if end > self.limit:
            raise self.refuse()
        if end > self.buffer.size:
            grown = np.empty(min(self.limit, max(end, int(self.buffer.size * 1.5))), np.float32)
            grown[:self.size] = self.buffer[:self.size]
            self.buffer = grown
        self.buffer[self.size:end] = samples
        self.size = end

    def samples(self) -> np.ndarray:
        return self.buffer[:self.size] if self.size == self.buffer.size else self.buffer[:self.size].copy()


def decode_audio(source: AudioInput, sample_rate: int = 16000, *, limits: Limits | None = None) -> DecodedAudio:
    """Decode, mix to mono and resample; bad or too costly input raises the SDK's ValidationError naming it."""
    import av

    limits = limits or DEFAULT_LIMITS
    opened, name = _open_source(source)
    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except PolarGridError:
        raise
    except Exception as exc:  # av.FFmpegError, and the odd ValueError/OSError on malformed headers
        raise invalid(f"{name} is not a readable audio file ({_reason(exc)})", field="file") from None
    with container:
        if not container.streams.audio:
            raise invalid(f"{name} has no audio stream", field="file")
        stream = container.streams.audio[0]
        codec = _check_stream(stream, name, limits)
        max_seconds = limits.max_audio_seconds
        declared = _declared_seconds(container, stream)
        too_long = lambda: invalid(  # noqa: E731
            f"{name} is longer than the {_hours(max_seconds)} this server accepts (Limits.max_audio_seconds)",
            field="file")
        if declared is not None and declared > max_seconds + 1.0:
            raise too_long()
        output = _Output(int((declared or _FIRST_GUESS_SECONDS) * sample_rate) + sample_rate,
                         int(max_seconds * sample_rate), too_long)
        resampler = None
        source_rate = channels = 0
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    source_rate, channels = frame.sample_rate, len(frame.layout.channels)
                    _check_rate(source_rate, name, limits)
                    resampler = _resampler(source_rate, sample_rate)
                mono = _frame_to_mono(frame)
                if mono.dtype.kind == "f" and not np.isfinite(mono).all():
                    raise invalid(f"{name} contains samples that are not finite numbers (NaN or Inf); "
                                  "float audio must hold finite samples", field="file")
                output.add(on_lane(resampler.process, mono))
        except PolarGridError:
            raise
        except Exception as exc:
            if not output.size:
                raise invalid(f"{name} could not be decoded ({_reason(exc)})", field="file") from None
            # A truncated file: keep what decoded cleanly, as ffmpeg does.
        if resampler is None:
            raise invalid(f"{name} contains no audio samples", field="file")
        output.add(on_lane(resampler.flush))
    samples = output.samples()
    if samples.size == 0:
        raise invalid(f"{name} contains no audio samples", field="file")
    return DecodedAudio(samples, sample_rate, source_rate, channels, codec)


def _check_stream(stream, name: str, limits: Limits) -> str:
    context = stream.codec_context
    codec = getattr(context, "name", None) or ""
    if not codec or codec == "none" or getattr(context, "codec", None) is None:
        tag = getattr(context, "codec_tag", "") or "unknown"
        raise invalid(f"{name} uses an audio codec this server cannot decode ({tag}); "
                      "send wav (PCM), mp3, m4a/aac, ogg/opus, flac or webm", field="file")
    _check_rate(context.sample_rate or stream.rate or 0, name, limits)
    return codec


def _check_rate(rate: int, name: str, limits: Limits) -> None:
    if not limits.min_audio_sample_rate <= rate <= limits.max_audio_sample_rate:
        raise invalid(f"{name} has a sample rate of {rate} Hz; this server accepts "
                      f"{limits.min_audio_sample_rate}..{limits.max_audio_sample_rate} Hz", field="file")


def _declared_seconds(container, stream) -> float | None:
    """The duration the container declares, if it declares one."""
    if stream.duration is not None and stream.time_base is not None and stream.duration > 0:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and container.duration > 0:
        return container.duration / 1_000_000
    return None


class _SwrResampler:
    """libswresample (through PyAV), for rate pairs whose polyphase table would be too large for our kernel."""

    def __init__(self, orig: int, target: int) -> None:
        import av

        self.orig = orig
        self._swr = av.AudioResampler(format="flt", layout="mono", rate=target)

    def _run(self, frame) -> np.ndarray:
        out = [f.to_ndarray().reshape(-1) for f in self._swr.resample(frame)]
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def process(self, chunk: np.ndarray) -> np.ndarray:
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk, np.float32)[None, :], format="flt",
                                           layout="mono")
        frame.sample_rate = self.orig
        return self._run(frame)

    def flush(self) -> np.ndarray:
        return self._run(None)


def _resampler(orig: int, target: int):
    from ..kernels.resample import Resampler  # numba: loaded with the first audio decoded

    ours = Resampler(orig, target)
    return ours if ours.up == ours.down or ours.table is not None else _SwrResampler(orig, target)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:g} h" if seconds >= 3600 else f"{seconds / 60:g} min"


def _frame_to_mono(frame) -> np.ndarray:
    from ..kernels import to_mono

    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    fmt = frame.format.name
    if fmt not in _SAMPLE_TYPES:
        data = data.astype(np.float32)
    if frame.format.is_planar:
        data = data.T  # (samples, channels): interleaved
    return to_mono(np.ascontiguousarray(data).reshape(-1, channels) if channels > 1 else data.reshape(-1), channels)


def _reason(exc: Exception) -> str:
    text = getattr(exc, "strerror", None) or str(exc)
    return text.split(":")[-1].strip() or type(exc).__name__
