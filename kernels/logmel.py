"""Whisper's log-mel spectrogram: the same numbers as faster-whisper's FeatureExtractor, computed faster.

One numba kernel (parallel over blocks of frames) reflect-pads, frames and windows, then takes the
400-point FFT of two real frames at once (one as the real part, the next as the imaginary part of one
complex FFT), splits their power spectra apart, and sums the mel bands (sparse: each triangle spans a
few bins). The FFT runs in float64: with it the result is within 2e-7 of a float64 reference, while
faster-whisper's own float32 FFT is up to ~7e-6 from it; the packing trick costs no accuracy at that
precision. log10 is numpy's vectorised ufunc, in place; the clamp to (max - 8) and the rescale are one pass.
"""
from __future__ import annotations

from functools import lru_cache

import llvmlite.binding
import numba
import numpy as np

# A radix-5 butterfly reads 10 rows and writes 10; LLVM's default of 8 runtime alias checks would leave its
# lane loop scalar ("too many memory checks needed"). Raising the bound only lets the vectoriser emit more
# checks (the scalar loop stays as the fallback); it must be set before the kernels are compiled.
llvmlite.binding.set_option("", "-runtime-memory-check-threshold=256")
llvmlite.binding.set_option("", "-vectorize-memory-check-threshold=256")

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_BINS = N_FFT // 2 + 1


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = 80, sr: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scaled triangular mel filters, as Whisper (and faster-whisper) build them."""
    fftfreqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sr)
    mels = np.linspace(0.0, 45.245640471924965, n_mels + 2)
    f_sp = 200.0 / 3
    freqs = f_sp * mels
    min_log_hz, min_log_mel, logstep = 1000.0, 1000.0 / f_sp, np.log(6.4) / 27.0
    log_t = mels >= min_log_mel
    freqs[log_t] = min_log_hz * np.exp(logstep * (mels[log_t] - min_log_mel))
    fdiff = np.diff(freqs)
    ramps = freqs.reshape(-1, 1) - fftfreqs.reshape(1, -1)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (freqs[2: n_mels + 2] - freqs[:n_mels]))[:, None]
    return weights.astype(np.float32)


@lru_cache(maxsize=4)
def _bands(n_mels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    weights = mel_filters(n_mels)
    nonzero = weights > 0
    lo = np.where(nonzero.any(1), nonzero.argmax(1), 0).astype(np.int64)
    hi = np.where(nonzero.any(1), N_BINS - nonzero[:, ::-1].argmax(1), 0).astype(np.int64)
    return weights, lo, hi


def _window() -> np.ndarray:
    return np.hanning(N_FFT + 1)[:-1].astype(np.float32)


def log_mel_spectrogram_numpy(audio: np.ndarray, n_mels: int = 80, padding: int = 160) -> np.ndarray:
    """Reference, in plain numpy and float64 throughout: (n_mels, frames) float32."""
    x = np.pad(np.asarray(audio, dtype=np.float32).astype(np.float64), (0, padding))
    x = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (x.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:n_frames] * _window().astype(np.float64)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = mel_filters(n_mels).astype(np.float64) @ power[:-1].T
    log_spec = np.log10(np.clip(mel, 1e-10, None))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# The 400-point DFT as a self-sorting (Stockham) mixed-radix FFT, 400 = 4 * 4 * 5 * 5, with hand-written
# radix-4 and radix-5 butterflies. Frames are processed LANES at a time with the frame index innermost,
# so every butterfly is a vector operation across frames, and a block's working set stays in L1/L2.
LANES = 16
RADICES = (4, 4, 5, 5)


@lru_cache(maxsize=1)
def _twiddles() -> tuple[np.ndarray, np.ndarray]:
    """exp(-2 pi i p k / n) for every stage (n the stage's length, p < n / radix, k < radix), stage after stage."""
    parts, n = [], N_FFT
    for radix in RADICES:
        m = n // radix
        pk = np.outer(np.arange(m), np.arange(radix))
        parts.append(np.exp(-2j * np.pi * pk / n).reshape(-1))
        n = m
    table = np.concatenate(parts)
    return (np.ascontiguousarray(table.real, dtype=np.float64), np.ascontiguousarray(table.imag, dtype=np.float64))


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mel_power(audio, padding, window, n_frames, tw_re, tw_im, mel_w, band_lo, band_hi, workers, out):
    n = audio.size
    total = n + padding
    per_block = 2 * LANES
    n_blocks = (n_frames + per_block - 1) // per_block
    for worker in numba.prange(workers):    # scratch allocated once per worker, not per block
        xr = np.empty((N_FFT, LANES), np.float64)
        xi = np.empty((N_FFT, LANES), np.float64)
        yr = np.empty((N_FFT, LANES), np.float64)
        yi = np.empty((N_FFT, LANES), np.float64)
        power_a = np.empty((N_BINS, LANES), np.float32)
        power_b = np.empty((N_BINS, LANES), np.float32)
        acc = np.empty(LANES, np.float32)
        for b in range(worker, n_blocks, workers):
            f0 = b * per_block
            _frames(audio, n, total, window, n_frames, f0, xr)            # frames f0.. as the real part
            _frames(audio, n, total, window, n_frames, f0 + LANES, xi)    # the next LANES as the imaginary
            _fft(xr, xi, yr, yi, tw_re, tw_im)
            _split_power(xr, xi, power_a, power_b)
            _project(power_a, mel_w, band_lo, band_hi, f0, acc, out)
            _project(power_b, mel_w, band_lo, band_hi, f0 + LANES, acc, out)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _frames(audio, n, total, window, n_frames, f0, x):
    """LANES frames from f0 on, reflect-padded and windowed; zeros beyond the last frame."""
    half = N_FFT // 2
    lanes = max(0, min(LANES, n_frames - f0))
    first = f0 * HOP - half
    if lanes == LANES and first >= 0 and first + (LANES - 1) * HOP + N_FFT <= n:
        for j in range(N_FFT):          # the common case: every frame inside the audio; stores contiguous
            w = window[j]
            for lane in range(LANES):
                x[j, lane] = np.float64(audio[first + lane * HOP + j]) * w
        return
    if lanes < LANES:
        x[:, :] = 0.0
    for lane in range(lanes):
        start = (f0 + lane) * HOP - half
        for j in range(N_FFT):
            i = start + j
            if i < 0:
                i = -i
            elif i >= total:
                i = 2 * (total - 1) - i
            x[j, lane] = (np.float64(audio[i]) if i < n else 0.0) * window[j]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _split_power(zr, zi, power_a, power_b):
    """Power spectra of the two real frames packed in z = a + ib: A[k] = (Z[k] + conj Z[N-k]) / 2 and
    B[k] = (Z[k] - conj Z[N-k]) / 2i. In float64 the cancellation this can involve costs nothing visible."""
    for k in range(N_BINS):
        r = (N_FFT - k) % N_FFT
        for lane in range(LANES):
            sr = zr[k, lane] + zr[r, lane]
            di = zi[k, lane] - zi[r, lane]
            dr = zr[k, lane] - zr[r, lane]
            si = zi[k, lane] + zi[r, lane]
            power_a[k, lane] = 0.25 * (sr * sr + di * di)
            power_b[k, lane] = 0.25 * (dr * dr + si * si)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _fft(xr, xi, yr, yi, tw_re, tw_im):
    """In-place 400-point FFT of each lane of (xr, xi), y as scratch; the stage order is RADICES."""
    _radix4(xr, xi, yr, yi, 400, 1, tw_re, tw_im, 0)          # twiddle tables: 400 + 100 + 25 + 5 entries
    _radix4(yr, yi, xr, xi, 100, 4, tw_re, tw_im, 400)
    _radix5(xr, xi, yr, yi, 25, 16, tw_re, tw_im, 500)
    _radix5(yr, yi, xr, xi, 5, 80, tw_re, tw_im, 525)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _radix4(ar, ai, br, bi, n, s, tw_re, tw_im, off):
    """One Stockham stage: b[q + s(4p + k)] = w^(pk) * sum_j a[q + s(p + jm)] e^(-2 pi i jk / 4)."""
    m = n // 4
    for p in range(m):
        t = off + 4 * p
        w1r, w1i = tw_re[t + 1], tw_im[t + 1]
        w2r, w2i = tw_re[t + 2], tw_im[t + 2]
        w3r, w3i = tw_re[t + 3], tw_im[t + 3]
        for q in range(s):
            i0 = q + s * p
            i1 = i0 + s * m
            i2 = i1 + s * m
            i3 = i2 + s * m
            o0 = q + s * 4 * p
            o1 = o0 + s
            o2 = o1 + s
            o3 = o2 + s
            for lane in range(LANES):
                s02r = ar[i0, lane] + ar[i2, lane]
                s02i = ai[i0, lane] + ai[i2, lane]
                d02r = ar[i0, lane] - ar[i2, lane]
                d02i = ai[i0, lane] - ai[i2, lane]
                s13r = ar[i1, lane] + ar[i3, lane]
                s13i = ai[i1, lane] + ai[i3, lane]
                d13r = ar[i1, lane] - ar[i3, lane]
                d13i = ai[i1, lane] - ai[i3, lane]
                br[o0, lane] = s02r + s13r
                bi[o0, lane] = s02i + s13i
                c1r = d02r + d13i          # x0 - i x1 - x2 + i x3
                c1i = d02i - d13r
                c2r = s02r - s13r
                c2i = s02i - s13i
                c3r = d02r - d13i          # x0 + i x1 - x2 - i x3
                c3i = d02i + d13r
                br[o1, lane] = c1r * w1r - c1i * w1i
                bi[o1, lane] = c1r * w1i + c1i * w1r
                br[o2, lane] = c2r * w2r - c2i * w2i
                bi[o2, lane] = c2r * w2i + c2i * w2r
                br[o3, lane] = c3r * w3r - c3i * w3i
                bi[o3, lane] = c3r * w3i + c3i * w3r


_C1, _C2 = np.cos(2 * np.pi / 5), np.cos(4 * np.pi / 5)
_S1, _S2 = np.sin(2 * np.pi / 5), np.sin(4 * np.pi / 5)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _radix5(ar, ai, br, bi, n, s, tw_re, tw_im, off):
    """One Stockham stage of radix 5 (pairs x1 +- x4 and x2 +- x3 share their products)."""
    m = n // 5
    for p in range(m):
        t = off + 5 * p
        w1r, w1i = tw_re[t + 1], tw_im[t + 1]
        w2r, w2i = tw_re[t + 2], tw_im[t + 2]
        w3r, w3i = tw_re[t + 3], tw_im[t + 3]
        w4r, w4i = tw_re[t + 4], tw_im[t + 4]
        for q in range(s):
            i0 = q + s * p
            i1 = i0 + s * m
            i2 = i1 + s * m
            i3 = i2 + s * m
            i4 = i3 + s * m
            o0 = q + s * 5 * p
            for lane in range(LANES):
                x0r = ar[i0, lane]
                x0i = ai[i0, lane]
                t1r = ar[i1, lane] + ar[i4, lane]
                t1i = ai[i1, lane] + ai[i4, lane]
                t2r = ar[i2, lane] + ar[i3, lane]
                t2i = ai[i2, lane] + ai[i3, lane]
                t3r = ar[i1, lane] - ar[i4, lane]
                t3i = ai[i1, lane] - ai[i4, lane]
                t4r = ar[i2, lane] - ar[i3, lane]
                t4i = ai[i2, lane] - ai[i3, lane]
                br[o0, lane] = x0r + t1r + t2r
                bi[o0, lane] = x0i + t1i + t2i
                b1r = x0r + _C1 * t1r + _C2 * t2r
                b1i = x0i + _C1 * t1i + _C2 * t2i
                b2r = x0r + _C2 * t1r + _C1 * t2r
                b2i = x0i + _C2 * t1i + _C1 * t2i
                d1r = _S1 * t3r + _S2 * t4r
                d1i = _S1 * t3i + _S2 * t4i
                d2r = _S2 * t3r - _S1 * t4r
                d2i = _S2 * t3i - _S1 * t4i
                c1r = b1r + d1i            # b1 - i d1
                c1i = b1i - d1r
                c4r = b1r - d1i            # b1 + i d1
                c4i = b1i + d1r
                c2r = b2r + d2i
                c2i = b2i - d2r
                c3r = b2r - d2i
                c3i = b2i + d2r
                br[o0 + s, lane] = c1r * w1r - c1i * w1i
                bi[o0 + s, lane] = c1r * w1i + c1i * w1r
                br[o0 + 2 * s, lane] = c2r * w2r - c2i * w2i
                bi[o0 + 2 * s, lane] = c2r * w2i + c2i * w2r
                br[o0 + 3 * s, lane] = c3r * w3r - c3i * w3i
                bi[o0 + 3 * s, lane] = c3r * w3i + c3i * w3r
                br[o0 + 4 * s, lane] = c4r * w4r - c4i * w4i
                bi[o0 + 4 * s, lane] = c4r * w4i + c4i * w4r


@numba.njit(cache=True, nogil=True, fastmath=True)
def _project(power, mel_w, band_lo, band_hi, f0, acc, out):
    """Mel bands of one block: each triangular filter touches at most a dozen bins."""
    lanes = max(0, min(LANES, out.shape[1] - f0))
    if lanes == 0:
        return
    for m in range(mel_w.shape[0]):
        acc[:] = 0.0
        for k in range(band_lo[m], band_hi[m]):
            w = mel_w[m, k]
            for lane in range(LANES):
                acc[lane] += w * power[k, lane]
        for lane in range(lanes):
            out[m, f0 + lane] = max(acc[lane], np.float32(1e-10))   # the floor before log10


def log_mel_spectrogram(audio: np.ndarray, n_mels: int = 80, padding: int = 160) -> np.ndarray:
    """Log-mel features of 16 kHz mono audio: (n_mels, frames) float32, as FeatureExtractor(feature_size=n_mels)."""
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if audio.ndim != 1:
        raise ValueError("log_mel_spectrogram expects mono 16 kHz audio: a 1-D array")
    total = audio.size + padding
    if total < N_FFT // 2 + 1:
        raise ValueError(f"audio too short: {audio.size} samples; at least {N_FFT // 2 + 1 - padding} needed")
    n_frames = 1 + (total + 2 * (N_FFT // 2) - N_FFT) // HOP
    mel = np.empty((n_mels, n_frames - 1), dtype=np.float32)  # the last frame is dropped, as Whisper does
    _mel_power(audio, padding, _window(), n_frames, *_twiddles(), *_bands(n_mels), numba.get_num_threads(), mel)
    np.log10(mel, out=mel)
    _clamp_and_scale(mel, mel.max() - np.float32(8.0))
    return mel


@numba.njit(cache=True, nogil=True, fastmath=True)
def _clamp_and_scale(mel, floor):
    """Whisper's dynamic-range clamp and rescale in one pass: (max(x, floor) + 4) / 4."""
    flat = mel.reshape(-1)
    for i in range(flat.size):
        flat[i] = (max(flat[i], floor) + np.float32(4.0)) * np.float32(0.25)
