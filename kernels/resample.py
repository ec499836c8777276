"""Band-limited resampling for any pair of integer rates: a Kaiser-windowed sinc, in polyphase form.

For output sample n at input time t = n * orig / target, y[n] = sum_i x[i] * h(t - i) with
h(u) = fc * sinc(fc * u) * kaiser(u / half), fc the cutoff (below the lower Nyquist) and half the
filter's reach in input samples. The ratio is reduced to up/down, so h is needed only at ``up``
distinct fractional offsets: a table of up x taps coefficients, computed once per rate pair.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numba
import numpy as np

ZERO_CROSSINGS = 32
ROLLOFF = 0.96
KAISER_BETA = 9.0
MAX_TABLE = 1 << 22  # coefficients; beyond this (odd rate pairs) they are computed per sample


def _validate(orig_sr: int, target_sr: int) -> tuple[int, int]:
    if int(orig_sr) != orig_sr or int(target_sr) != target_sr or orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {target_sr}")
    g = math.gcd(int(orig_sr), int(target_sr))
    return int(target_sr) // g, int(orig_sr) // g


def _design(up: int, down: int) -> tuple[float, float, int]:
    fc = ROLLOFF * min(1.0, up / down)
    half = ZERO_CROSSINGS / fc
    return fc, half, int(math.ceil(half))


def _h(u: np.ndarray, fc: float, half: float) -> np.ndarray:
    inside = np.abs(u) < half
    ratio = np.where(inside, u / half, 0.0)
    window = np.i0(KAISER_BETA * np.sqrt(1.0 - ratio * ratio)) / np.i0(KAISER_BETA)
    return np.where(inside, fc * np.sinc(fc * u) * window, 0.0)


@lru_cache(maxsize=32)
def _table(up: int, down: int) -> np.ndarray:
    fc, half, reach = _design(up, down)
    phases = np.arange(up, dtype=np.float64)[:, None] / up
    taps = np.arange(2 * reach, dtype=np.float64)[None, :]
    return _h(phases + reach - 1 - taps, fc, half).astype(np.float32)


def output_length(n_in: int, orig_sr: int, target_sr: int) -> int:
    up, down = _validate(orig_sr, target_sr)
    return -(-n_in * up // down)


def resample_numpy(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Reference: the same filter, evaluated directly (slow; for tests)."""
    up, down = _validate(orig_sr, target_sr)
    x = np.asarray(audio, dtype=np.float64)
    if up == down:
        return x.astype(np.float32)
    fc, half, reach = _design(up, down)
    n = np.arange(output_length(x.size, orig_sr, target_sr))
    out = np.empty(n.size, dtype=np.float32)
    padded = np.concatenate([np.zeros(2 * reach), x, np.zeros(2 * reach)])
    for start in range(0, n.size, 4096):
        block = n[start:start + 4096]
        i0 = block * down // up
        frac = (block * down - i0 * up) / up
        j = np.arange(2 * reach)
        idx = i0[:, None] - reach + 1 + j[None, :]
        u = frac[:, None] + reach - 1 - j[None, :]
        out[start:start + 4096] = (padded[idx + 2 * reach] * _h(u, fc, half)).sum(axis=1)
    return out


@numba.njit(cache=True, fastmath=True, nogil=True, inline="always")
def _polyphase_at(x, base, table, up, down, reach, n):
    """Output sample ``n`` from the polyphase table."""
    taps = table.shape[1]
    nx = x.size
    num = n * down
    i0 = num // up
    phase = num - i0 * up
    first = i0 - reach + 1 - base
    acc = np.float32(0.0)
    if first >= 0 and first + taps <= nx:
        for j in range(taps):
            acc += x[first + j] * table[phase, j]
    else:
        for j in range(taps):
            i = first + j
            if i >= 0 and i < nx:
                acc += x[i] * table[phase, j]
    return acc


@numba.njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _polyphase(x, base, table, up, down, reach, n_start, out):
    for k in numba.prange(out.size):
        out[k] = _polyphase_at(x, base, table, up, down, reach, n_start + k)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _polyphase_serial(x, base, table, up, down, reach, n_start, out):
    for k in range(out.size):
        out[k] = _polyphase_at(x, base, table, up, down, reach, n_start + k)


@numba.njit(cache=True, fastmath=True)
def _i0(v):
    total, term, k = 1.0, 1.0, 1
    while term > 1e-12 * total:
        term *= (v / (2.0 * k)) ** 2
        total += term
        k += 1
    return total


@numba.njit(cache=True, fastmath=True, nogil=True, inline="always")
def _direct_at(x, base, up, down, fc, half, reach, beta, norm, n):
    """Output sample ``n`` with the Kaiser-windowed sinc computed on the spot (rate pairs too odd for a table)."""
    nx = x.size
    num = n * down
    i0 = num // up
    frac = (num - i0 * up) / up
    acc = 0.0
    for j in range(2 * reach):
        i = i0 - reach + 1 + j - base
        if i < 0 or i >= nx:
            continue
        u = frac + reach - 1 - j
        if abs(u) >= half:
            continue
        r = u / half
        s = 1.0 if u == 0.0 else math.sin(math.pi * fc * u) / (math.pi * fc * u)
        acc += x[i] * fc * s * _i0(beta * math.sqrt(1.0 - r * r)) / norm
    return acc


@numba.njit(parallel=True, cache=True, fastmath=True, nogil=True)
def _direct(x, base, up, down, fc, half, reach, beta, n_start, out):
    norm = _i0(beta)
    for k in numba.prange(out.size):
        out[k] = _direct_at(x, base, up, down, fc, half, reach, beta, norm, n_start + k)


@numba.njit(cache=True, fastmath=True, nogil=True)
def _direct_serial(x, base, up, down, fc, half, reach, beta, n_start, out):
    norm = _i0(beta)
    for k in range(out.size):
        out[k] = _direct_at(x, base, up, down, fc, half, reach, beta, norm, n_start + k)


class Resampler:
    """Resamples a stream chunk by chunk with the same result as one call on the whole signal.

    ``parallel=False`` runs the kernel on the calling thread alone: no thread team is started (an OpenMP
    team per calling thread slows llama.cpp's down; see polargrid_local/runtime/compute.py)."""

    def __init__(self, orig_sr: int, target_sr: int, *, parallel: bool = True) -> None:
        self.up, self.down = _validate(orig_sr, target_sr)
        self._polyphase = _polyphase if parallel else _polyphase_serial
        self._direct = _direct if parallel else _direct_serial
        self.orig_sr, self.target_sr = int(orig_sr), int(target_sr)
        self.fc, self.half, self.reach = _design(self.up, self.down)
        use_table = self.up * 2 * self.reach <= MAX_TABLE
        self.table = _table(self.up, self.down) if use_table else None
        self._buffer = np.zeros(0, dtype=np.float32)
        self._base = 0        # absolute index of _buffer[0]
        self._seen = 0        # input samples received
        self._next = 0        # next output index

    def _run(self, n_end: int) -> np.ndarray:
        out = np.empty(max(0, n_end - self._next), dtype=np.float32)
        if out.size:
            if self.table is not None:
                self._polyphase(self._buffer, self._base, self.table, self.up, self.down, self.reach, self._next,
                                out)
            else:
                self._direct(self._buffer.astype(np.float64), self._base, self.up, self.down, self.fc, self.half,
                        self.reach, KAISER_BETA, self._next, out)
            self._next = n_end
        return out

    def process(self, chunk: np.ndarray) -> np.ndarray:
        """Feed input samples; returns every output sample they complete."""
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if self.up == self.down:
            return chunk.copy()
        self._buffer = np.concatenate([self._buffer, chunk])
        self._seen += chunk.size
        # output n is complete once input i0(n) + reach is present
        n_end = max(self._next, ((self._seen - 1 - self.reach) * self.up) // self.down + 1)
        out = self._run(n_end)
        keep_from = (self._next * self.down) // self.up - self.reach + 1
        drop = max(0, keep_from - self._base)
        if drop:
            self._buffer = self._buffer[drop:]
            self._base += drop
        return out

    def flush(self) -> np.ndarray:
        """The remaining output once the input has ended."""
        if self.up == self.down:
            return np.zeros(0, dtype=np.float32)
        return self._run(-(-self._seen * self.up // self.down))


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample mono float audio from orig_sr to target_sr (any positive integer rates)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError("resample expects mono audio: a 1-D array")
    stream = Resampler(orig_sr, target_sr)
    if stream.up == stream.down:
        return np.asarray(audio, dtype=np.float32).copy()
    stream._buffer = np.ascontiguousarray(audio, dtype=np.float32)  # one call: no copy into the stream buffer
    stream._seen = stream._buffer.size
    return stream.flush()
