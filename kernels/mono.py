"""Interleaved PCM of any common sample type to mono float32 in [-1, 1]."""
from __future__ import annotations

import numba
import numpy as np

_SCALES = {np.dtype(np.int16): 1.0 / 32768.0, np.dtype(np.int32): 1.0 / 2147483648.0,
           np.dtype(np.uint8): 1.0 / 128.0, np.dtype(np.float32): 1.0, np.dtype(np.float64): 1.0}


def _check(samples: np.ndarray, channels: int) -> tuple[np.ndarray, float]:
    samples = np.asarray(samples)
    if samples.ndim == 2:  # (frames, channels)
        channels = samples.shape[1]
        samples = samples.reshape(-1)
    if samples.ndim != 1:
        raise ValueError("expected interleaved samples: a 1-D array, or 2-D (frames, channels)")
    if channels < 1 or samples.size % channels:
        raise ValueError(f"{samples.size} samples do not split into {channels} channels")
    scale = _SCALES.get(samples.dtype)
    if scale is None:
        raise ValueError(f"unsupported sample type {samples.dtype}; use int16, int32, uint8, float32 or float64")
    return np.ascontiguousarray(samples), scale


def to_mono_numpy(samples: np.ndarray, channels: int = 1) -> np.ndarray:
    """Reference: average the channels, scale integers to [-1, 1)."""
    if np.asarray(samples).ndim == 2:
        channels = np.asarray(samples).shape[1]
    samples, scale = _check(samples, channels)
    frames = samples.reshape(-1, channels).astype(np.float64)
    if samples.dtype == np.uint8:
        frames -= 128.0
    return (frames.mean(axis=1) * scale).astype(np.float32)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _mono_kernel(samples, channels, scale, offset, out):
    weight = scale / channels
    for i in range(out.size):
        acc = 0.0
        base = i * channels
        for c in range(channels):
            acc += samples[base + c] - offset
        out[i] = acc * weight


def to_mono(samples: np.ndarray, channels: int = 1) -> np.ndarray:
    """Average interleaved channels into mono float32, scaling integer PCM to [-1, 1)."""
    if np.asarray(samples).ndim == 2:
        channels = np.asarray(samples).shape[1]
    samples, scale = _check(samples, channels)
    out = np.empty(samples.size // channels, dtype=np.float32)
    if out.size:
        _mono_kernel(samples, channels, scale, 128.0 if samples.dtype == np.uint8 else 0.0, out)
    return out
