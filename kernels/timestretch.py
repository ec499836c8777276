"""Pitch-preserving time stretch by WSOLA (waveform-similarity overlap-add), for TTS ``speed``.

Output frames of FRAME samples are laid every FRAME/2 samples; each is read from the input near
position k * FRAME/2 * rate, shifted within +-TOLERANCE to the offset whose waveform best continues
the previous frame, then Hann-windowed and overlap-added. The duration scales by exactly 1/rate.
"""
from __future__ import annotations

import numba
import numpy as np


def _params(sample_rate: int) -> tuple[int, int]:
    frame = int(0.030 * sample_rate) // 2 * 2       # 30 ms
    return frame, int(0.010 * sample_rate)         # +-10 ms search


def _check(audio: np.ndarray, rate: float) -> np.ndarray:
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError("time_stretch expects mono audio: a 1-D array")
    if not 0.25 <= rate <= 4.0:
        raise ValueError(f"rate must be between 0.25 and 4.0, got {rate}")
    return audio


def _plan(n_in: int, rate: float, frame: int) -> tuple[int, int]:
    n_out = int(round(n_in / rate))
    return n_out, n_out // (frame // 2) + 1


def _setup(audio: np.ndarray, rate: float, sample_rate: int):
    """Padded input, window, sizes and output buffers shared by both implementations; None: nothing to do."""
    audio = _check(audio, rate)
    if rate == 1.0 or audio.size == 0:
        return None
    frame, tol = _params(sample_rate)
    hop = frame // 2
    n_out, n_frames = _plan(audio.size, rate, frame)
    window = np.hanning(frame + 1)[:-1].astype(np.float32)
    padded = np.concatenate([np.zeros(tol, np.float32), audio, np.zeros(frame + tol + int(hop * rate) + 2, np.float32)])
    out = np.zeros(n_frames * hop + frame, np.float32)
    return padded, window, frame, tol, hop, n_out, n_frames, out, np.zeros_like(out)


def time_stretch_numpy(audio: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """Reference implementation, plain numpy."""
    setup = _setup(audio, rate, sample_rate)
    if setup is None:
        return _check(audio, rate).copy()
    padded, window, frame, tol, hop, n_out, n_frames, out, norm = setup
    previous = tol  # padded index where the last frame was read
    for k in range(n_frames):
        nominal = tol + int(round(k * hop * rate))
        if k == 0:
            best = nominal
        else:
            target = padded[previous + hop: previous + hop + frame]
            offsets = np.arange(-tol, tol + 1)
            starts = np.clip(nominal + offsets, 0, padded.size - frame)
            scores = np.array([np.dot(padded[s: s + frame], target) for s in starts], dtype=np.float64)
            best = int(starts[int(np.argmax(scores))])
        out[k * hop: k * hop + frame] += padded[best: best + frame] * window
        norm[k * hop: k * hop + frame] += window
        previous = best
    return (out / np.maximum(norm, 1e-3))[:n_out].astype(np.float32)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _wsola(padded, rate, frame, tol, n_frames, window, out, norm):
    hop = frame // 2
    previous = tol
    limit = padded.size - frame
    for k in range(n_frames):
        nominal = tol + int(round(k * hop * rate))
        best = nominal
        if k > 0:
            best_score = -np.inf
            for offset in range(-tol, tol + 1):
                s = min(max(nominal + offset, 0), limit)
                score = 0.0
                for j in range(frame):
                    score += padded[s + j] * padded[previous + hop + j]
                if score > best_score:
                    best_score = score
                    best = s
        for j in range(frame):
            out[k * hop + j] += padded[best + j] * window[j]
            norm[k * hop + j] += window[j]
        previous = best


def time_stretch(audio: np.ndarray, rate: float, sample_rate: int) -> np.ndarray:
    """Play ``rate`` times faster (0.25..4) without changing pitch; the result has len(audio)/rate samples."""
    setup = _setup(audio, rate, sample_rate)
    if setup is None:
        return _check(audio, rate).copy()
    padded, window, frame, tol, hop, n_out, n_frames, out, norm = setup
    _wsola(padded, float(rate), frame, tol, n_frames, window, out, norm)
    return (out / np.maximum(norm, np.float32(1e-3)))[:n_out]
