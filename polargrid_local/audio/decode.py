"""Any audio PyAV can read (wav, mp3, m4a, ogg, flac, webm...) to mono float32 at the rate a model wants.

Decoding streams: frames are mixed to mono and resampled as they come, so the whole
file at its original rate and channel count is never held in memory.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from ..errors import invalid

AudioInput = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]

DEFAULT_MAX_SECONDS = 4 * 3600.0
_SAMPLE_TYPES = {"s16": np.int16, "s16p": np.int16, "s32": np.int32, "s32p": np.int32, "flt": np.float32,
                 "fltp": np.float32, "dbl": np.float64, "dblp": np.float64, "u8": np.uint8, "u8p": np.uint8}


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


def decode_audio(source: AudioInput, sample_rate: int = 16000, *, max_seconds: float = DEFAULT_MAX_SECONDS
                 ) -> DecodedAudio:
    """Decode, mix to mono and resample; bad input raises the SDK's ValidationError naming the problem."""
    import av

    opened, name = _open_source(source)
    try:
        container = av.open(opened, mode="r", metadata_errors="ignore")
    except av.FFmpegError as exc:
        raise invalid(f"{name} is not a readable audio file ({_reason(exc)})", field="file") from None
    with container:
        if not container.streams.audio:
            raise invalid(f"{name} has no audio stream", field="file")
        stream = container.streams.audio[0]
        codec = stream.codec_context.name
        from ..kernels.resample import Resampler  # numba: loaded with the first audio decoded

        resampler: Resampler | None = None
        pieces: list[np.ndarray] = []
        produced = 0
        source_rate = channels = 0
        try:
            for frame in container.decode(stream):
                if resampler is None:
                    source_rate, channels = frame.sample_rate, len(frame.layout.channels)
                    resampler = Resampler(source_rate, sample_rate)
                mono = _frame_to_mono(frame)
                out = resampler.process(mono)
                produced += out.size
                if produced > max_seconds * sample_rate:
                    raise invalid(f"{name} is longer than the {max_seconds / 3600:.1f} h this server accepts",
                                  field="file")
                pieces.append(out)
        except av.FFmpegError as exc:
            if not pieces:
                raise invalid(f"{name} could not be decoded ({_reason(exc)})", field="file") from None
            # A truncated file: keep what decoded cleanly, as ffmpeg does.
        if resampler is None:
            raise invalid(f"{name} contains no audio samples", field="file")
        pieces.append(resampler.flush())
    samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise invalid(f"{name} contains no audio samples", field="file")
    return DecodedAudio(samples, sample_rate, source_rate, channels, codec)


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
