"""Mono float32 PCM to the OpenAI speech formats, with PyAV (no ffmpeg binary): all of them streamable."""
from __future__ import annotations

import io
import struct
from typing import Any

import numpy as np

from ..errors import invalid

# format -> (container, codec, sample format); pcm and wav are written by hand.
_CODECS = {"mp3": ("mp3", "libmp3lame", "s16p"), "opus": ("ogg", "libopus", "s16"), "aac": ("adts", "aac", "fltp"),
           "flac": ("flac", "flac", "s16")}
FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac",
                 "wav": "audio/wav", "pcm": "audio/pcm"}


def _int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")


class _Sink(io.RawIOBase):
    """A write-only file that hands out what the muxer wrote since the last read."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        out, self._chunks = b"".join(self._chunks), []
        return out


class StreamEncoder:
    """Encodes audio chunk by chunk: ``feed()`` returns the bytes ready so far, ``close()`` the rest."""

    def __init__(self, fmt: str, sample_rate: int) -> None:
        fmt = (fmt or "").lower()
        if fmt not in FORMATS:
            raise invalid(f"Unsupported response_format {fmt!r}; choose one of: {', '.join(FORMATS)}",
                          field="response_format")
        self.format, self.sample_rate = fmt, sample_rate
        self._header_sent = False
        self._container: Any = None   # PyAV's output container and audio stream (None for pcm and wav)
        self._stream: Any = None
        if fmt in _CODECS:
            import av

            container_name, codec, sample_format = _CODECS[fmt]
            self._sink = _Sink()
            # Short ogg pages, so streamed opus reaches the listener sentence by sentence.
            options = {"page_duration": "100000"} if container_name == "ogg" else {}
            self._container = av.open(self._sink, mode="w", format=container_name, options=options)
            self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
            if fmt == "mp3":
                self._stream.bit_rate = 64000
            self._sample_format = sample_format
            self._pts = 0

    def feed(self, samples: np.ndarray) -> bytes:
        if self.format == "pcm":
            return _int16(samples).tobytes()
        if self.format == "wav":
            head = b""
            if not self._header_sent:  # length unknown while streaming: the maximum, as OpenAI sends
                self._header_sent = True
                head = _wav_header(self.sample_rate, 0xFFFFFFFF - 36)
            return head + _int16(samples).tobytes()
        if samples.size == 0:
            return b""
        import av

        if self._sample_format == "fltp":
            frame = av.AudioFrame.from_ndarray(samples.astype(np.float32)[None, :], format="fltp", layout="mono")
        else:
            frame = av.AudioFrame.from_ndarray(_int16(samples)[None, :], format=self._sample_format, layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._pts
        self._pts += samples.size
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def close(self) -> bytes:
        if self._container is None:
            return b""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        self._container = None
        return self._sink.take()


def _wav_header(sample_rate: int, data_bytes: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVEfmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" +
            struct.pack("<I", data_bytes))


def encode_audio(samples: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """The whole clip in one format; wav gets its real length in the header."""
    if (fmt or "").lower() == "wav":
        return _wav_header(sample_rate, samples.size * 2) + _int16(samples).tobytes()
    encoder = StreamEncoder(fmt, sample_rate)
    return encoder.feed(np.asarray(samples, dtype=np.float32)) + encoder.close()


def fix_wav_sizes(data: bytes) -> bytes:
    """A streamed wav (sizes unknown when its header went out) with its real RIFF and data sizes."""
    if len(data) < 44 or data[:4] != b"RIFF":
        return data
    return data[:4] + struct.pack("<I", len(data) - 8) + data[8:40] + struct.pack("<I", len(data) - 44) + data[44:]
