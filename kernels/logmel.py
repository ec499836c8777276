"""Whisper's log-mel spectrogram: the same numbers as faster-whisper's FeatureExtractor, computed faster.

One numba kernel (parallel over blocks of frames) reflect-pads, frames, windows, takes each
frame's 400-point DFT, its power, and the mel bands (sparse: each triangle spans a few bins);
log10, the clamp to (max - 8) and the rescale are numpy's vectorised ufuncs, in place.
"""
from __future__ import annotations

from functools import lru_cache

import numba
import numpy as np

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
    """Reference, in plain numpy: (n_mels, frames) float32."""
    x = np.pad(np.asarray(audio, dtype=np.float32), (0, padding))
    x = np.pad(x, (N_FFT // 2, N_FFT // 2), mode="reflect")
    n_frames = 1 + (x.size - N_FFT) // HOP
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:n_frames] * _window()
    power = np.abs(np.fft.rfft(frames, axis=-1)).astype(np.float32) ** 2
    mel = mel_filters(n_mels) @ power[:-1].T
    log_spec = np.log10(np.clip(mel, 1e-10, None))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


# The 400-point real DFT as 25 x 16 (Cooley-Tukey): n = 16*n1 + n2, k = k1 + 25*k2.
# Frames are processed LANES at a time with the frame index innermost, so every
# butterfly is a vector operation across frames.
LANES = 128
_N1, _N2 = 25, 16


@lru_cache(maxsize=1)
def _dft_tables() -> tuple[np.ndarray, ...]:
    n1, k1, n2 = np.arange(_N1), np.arange(_N1), np.arange(_N2)
    inner = np.exp(-2j * np.pi * np.outer(k1[: _N1 // 2 + 1], n1) / _N1)
    twiddle = np.exp(-2j * np.pi * np.outer(k1, n2) / N_FFT)
    outer = np.exp(-2j * np.pi * np.outer(np.arange(_N2), n2) / _N2)
    return tuple(np.ascontiguousarray(a, dtype=np.float32)
                 for a in (inner.real, inner.imag, twiddle.real, twiddle.imag, outer.real, outer.imag))


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mel_power(audio, padding, window, n_frames, c1, s1, t_re, t_im, w_re, w_im, mel_w, band_lo, band_hi,
               workers, out):
    n = audio.size
    total = n + padding
    half = N_FFT // 2
    n_blocks = (n_frames + LANES - 1) // LANES
    for worker in numba.prange(workers):    # scratch allocated once per worker, not per block
        xs = np.zeros((N_FFT, LANES), np.float32)
        y_re = np.empty((_N1, _N2, LANES), np.float32)
        y_im = np.empty((_N1, _N2, LANES), np.float32)
        a_re = np.empty(LANES, np.float32)
        a_im = np.empty(LANES, np.float32)
        power = np.empty((N_BINS, LANES), np.float32)
        for b in range(worker, n_blocks, workers):
            _block(audio, n, total, half, window, n_frames, b, c1, s1, t_re, t_im, w_re, w_im,
                   xs, y_re, y_im, a_re, a_im, power)
            _project(power, mel_w, band_lo, band_hi, b * LANES, a_re, out)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _block(audio, n, total, half, window, n_frames, b, c1, s1, t_re, t_im, w_re, w_im,
           xs, y_re, y_im, a_re, a_im, power):
    f0 = b * LANES
    lanes = min(LANES, n_frames - f0)
    if lanes < LANES:
        xs[:, :] = 0.0
    for lane in range(lanes):           # frame, reflect-padded, windowed
        start = (f0 + lane) * HOP - half
        for j in range(N_FFT):
            i = start + j
            if i < 0:
                i = -i
            elif i >= total:
                i = 2 * (total - 1) - i
            xs[j, lane] = (audio[i] if i < n else np.float32(0.0)) * window[j]
    for q in range(_N2):                # length-25 DFTs of real data, then twiddles
        for k in range(_N1 // 2 + 1):
            a_re[:] = 0.0
            a_im[:] = 0.0
            for p in range(_N1):
                c = c1[k, p]
                s = s1[k, p]
                row = _N2 * p + q
                for lane in range(LANES):
                    v = xs[row, lane]
                    a_re[lane] += v * c
                    a_im[lane] += v * s
            tr, ti = t_re[k, q], t_im[k, q]
            for lane in range(LANES):
                y_re[k, q, lane] = a_re[lane] * tr - a_im[lane] * ti
                y_im[k, q, lane] = a_re[lane] * ti + a_im[lane] * tr
            if k > 0:                   # the mirrored bin is the conjugate
                kk = _N1 - k
                tr, ti = t_re[kk, q], t_im[kk, q]
                for lane in range(LANES):
                    y_re[kk, q, lane] = a_re[lane] * tr + a_im[lane] * ti
                    y_im[kk, q, lane] = a_re[lane] * ti - a_im[lane] * tr
    for k in range(_N1):                # length-16 DFTs, only the bins 0..200 we need
        for m in range(9 if k == 0 else 8):
            a_re[:] = 0.0
            a_im[:] = 0.0
            for q in range(_N2):
                wr, wi = w_re[m, q], w_im[m, q]
                for lane in range(LANES):
                    yr = y_re[k, q, lane]
                    yi = y_im[k, q, lane]
                    a_re[lane] += yr * wr - yi * wi
                    a_im[lane] += yr * wi + yi * wr
            column = k + _N1 * m
            for lane in range(LANES):
                power[column, lane] = a_re[lane] * a_re[lane] + a_im[lane] * a_im[lane]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _project(power, mel_w, band_lo, band_hi, f0, acc, out):
    """Mel bands of one block: each triangular filter touches at most a dozen bins."""
    lanes = min(LANES, out.shape[1] - f0)
    for m in range(mel_w.shape[0]):
        acc[:] = 0.0
        for k in range(band_lo[m], band_hi[m]):
            w = mel_w[m, k]
            for lane in range(LANES):
                acc[lane] += w * power[k, lane]
        for lane in range(lanes):
            out[m, f0 + lane] = acc[lane]


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
    _mel_power(audio, padding, _window(), n_frames, *_dft_tables(), *_bands(n_mels), numba.get_num_threads(), mel)
    np.maximum(mel, np.float32(1e-10), out=mel)
    np.log10(mel, out=mel)
    np.maximum(mel, mel.max() - np.float32(8.0), out=mel)
    mel += np.float32(4.0)
    mel *= np.float32(0.25)
    return mel
