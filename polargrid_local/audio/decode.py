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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from ..errors import PolarGridError, invalid
from ..limits import DEFAULT_LIMITS, Limits

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
    reader = AudioReader(source, sample_rate, limits=limits)
    samples, _rest = reader.head(None)
    return DecodedAudio(samples, sample_rate, reader.source_rate, reader.source_channels, reader.codec)


class AudioReader:
    """An audio file opened and checked (codec, sample rate, declared duration), decoded on demand.

    ``blocks()`` yields mono float32 blocks at ``sample_rate`` as they decode, so a long file never has to be
    held whole: what it may cost is checked as it goes (its total length against ``max_audio_seconds``,
    non-finite samples). ``head(seconds)`` decodes the start into one array and hands back the rest.
    """

    def __init__(self, source: AudioInput, sample_rate: int = 16000, *, limits: Limits | None = None) -> None:
        import av

        self.limits = limits or DEFAULT_LIMITS
        self.sample_rate = sample_rate
        opened, self.name = _open_source(source)
        try:
            self._container = av.open(opened, mode="r", metadata_errors="ignore")
        except PolarGridError:
            raise
        except Exception as exc:  # av.FFmpegError, and the odd ValueError/OSError on malformed headers
            raise invalid(f"{self.name} is not a readable audio file ({_reason(exc)})", field="file") from None
        try:
            if not self._container.streams.audio:
                raise invalid(f"{self.name} has no audio stream", field="file")
            self._stream = self._container.streams.audio[0]
            self.codec = _check_stream(self._stream, self.name, self.limits)
            self.declared_seconds = _declared_seconds(self._container, self._stream)
            if self.declared_seconds is not None and self.declared_seconds > self.limits.max_audio_seconds + 1.0:
                raise self._too_long()
        except BaseException:
            self._container.close()
            raise
        self.source_rate = self.source_channels = 0
        self.decoded = 0          # samples handed out so far

    def _too_long(self) -> PolarGridError:
        return invalid(f"{self.name} is longer than the {_hours(self.limits.max_audio_seconds)} this server accepts "
                       "(Limits.max_audio_seconds)", field="file")

    def blocks(self) -> Iterator[np.ndarray]:
        """The samples as they decode (mono float32 at ``sample_rate``); the file is closed at the end."""
        limit = int(self.limits.max_audio_seconds * self.sample_rate)
        resampler = None
        try:
            try:
                for frame in self._container.decode(self._stream):
                    if resampler is None:
                        self.source_rate, self.source_channels = frame.sample_rate, len(frame.layout.channels)
                        _check_rate(self.source_rate, self.name, self.limits)
                        resampler = _resampler(self.source_rate, self.sample_rate)
                    mono = _frame_to_mono(frame)
                    if mono.dtype.kind == "f" and not np.isfinite(mono).all():
                        raise invalid(f"{self.name} contains samples that are not finite numbers (NaN or Inf); "
                                      "float audio must hold finite samples", field="file")
                    yield from self._checked(resampler.process(mono), limit)
            except PolarGridError:
                raise
            except Exception as exc:
                if not self.decoded:
                    raise invalid(f"{self.name} could not be decoded ({_reason(exc)})", field="file") from None
                # A truncated file: keep what decoded cleanly, as ffmpeg does.
            if resampler is None:
                raise invalid(f"{self.name} contains no audio samples", field="file")
            yield from self._checked(resampler.flush(), limit)
            if not self.decoded:
                raise invalid(f"{self.name} contains no audio samples", field="file")
        finally:
            self.close()

    def _checked(self, samples: np.ndarray, limit: int) -> Iterator[np.ndarray]:
        if not samples.size:
            return
        if self.decoded + samples.size > limit:
            raise self._too_long()
        self.decoded += samples.size
        yield samples

    def head(self, seconds: float | None) -> tuple[np.ndarray, Iterator[np.ndarray] | None]:
        """The first ``seconds`` (or, with None, all) of the audio as one array, and the blocks after it (None
        when the file ended within the head)."""
        wanted = None if seconds is None else int(seconds * self.sample_rate)
        expected = int((self.declared_seconds or _FIRST_GUESS_SECONDS) * self.sample_rate) + self.sample_rate
        output = _Output(expected if wanted is None else min(expected, wanted + self.sample_rate),
                         int(self.limits.max_audio_seconds * self.sample_rate), self._too_long)
        blocks = self.blocks()
        for block in blocks:
            output.add(block)
            if wanted is not None and output.size >= wanted:
                return output.samples(), blocks
        return output.samples(), None

    def close(self) -> None:
        self._container.close()


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

    ours = Resampler(orig, target, parallel=False)   # the caller's thread alone: no team, no lane to wait for
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
