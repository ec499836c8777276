"""Whisper's log-mel spectrogram: the same numbers as faster-whisper's FeatureExtractor, computed faster.

One numba kernel, parallel over chunks of frames. Each chunk of the reflect-padded signal is first laid
out hop-major (row c holds sample c of every hop), so that the same sample of consecutive frames is one
contiguous run: framing and windowing become vector copies. The 400-point FFT then takes two real frames
at once (one as the real part, the next as the imaginary part of one complex FFT), LANES frame pairs side
by side as SIMD lanes; the power spectra are split apart and the mel bands summed sparsely (each triangle
spans a few bins). The FFT runs in float64: the result is within 2e-7 of a float64 reference, while
faster-whisper's own float32 FFT is up to ~7e-6 from it. log10 is numpy's vectorised ufunc, in place;
the clamp to (max - 8) and the rescale are one pass.
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


# The 400-point DFT as an in-place decimation-in-frequency FFT, 400 = 4 * 4 * 5 * 5, with hand-written
# radix-4 and radix-5 butterflies. One flat buffer holds LANES complex frames, sample-major with the frame
# innermost (real parts, then imaginary parts), so every butterfly is a vector operation across frames.
# Keeping real and imaginary parts in one array, read and written in place at affine offsets, lets LLVM
# vectorise without runtime alias checks; the output comes out in digit-reversed order (_positions).
LANES = 64
RADICES = (4, 4, 5, 5)
IM = N_FFT * LANES              # where the imaginary parts start in the buffer
CHUNK_BLOCKS = 4                # blocks of 2 * LANES frames per hop-major chunk: ~330 kB, cache-sized


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


@lru_cache(maxsize=1)
def _positions() -> np.ndarray:
    """Where the in-place FFT leaves bin k: its index with the mixed-radix digits (4, 4, 5, 5) reversed."""
    k = np.arange(N_FFT)
    return ((k % 4) * 100 + ((k // 4) % 4) * 25 + ((k // 16) % 5) * 5 + k // 80).astype(np.int64)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)
def _mel_power(audio, padding, window, n_frames, tw_re, tw_im, position, mel_w, band_lo, band_hi, workers, out):
    total = audio.size + padding
    per_block = 2 * LANES
    n_blocks = (n_frames + per_block - 1) // per_block
    n_chunks = (n_blocks + CHUNK_BLOCKS - 1) // CHUNK_BLOCKS
    for worker in numba.prange(workers):    # scratch allocated once per worker, not per chunk
        hops = np.empty((HOP, CHUNK_BLOCKS * per_block + N_FFT // HOP + 1), np.float32)
        z = np.empty(2 * IM, np.float64)
        power_a = np.empty((N_BINS, LANES), np.float32)
        power_b = np.empty((N_BINS, LANES), np.float32)
        acc = np.empty(LANES, np.float32)
        for chunk in range(worker, n_chunks, workers):
            first = chunk * CHUNK_BLOCKS * per_block
            blocks = min(CHUNK_BLOCKS, n_blocks - chunk * CHUNK_BLOCKS)
            _hop_major(audio, total, first, hops, blocks * per_block + N_FFT // HOP + 1)
            for b in range(blocks):
                _frames(hops, b * per_block, window, z)
                _dif4(z, 400, tw_re, tw_im, 0)           # twiddle tables: 400 + 100 + 25 + 5 entries
                _dif4(z, 100, tw_re, tw_im, 400)
                _dif5(z, 25, tw_re, tw_im, 500)
                _dif5(z, 5, tw_re, tw_im, 525)
                _split_power(z, position, power_a, power_b)
                f0 = first + b * per_block
                _project(power_a, mel_w, band_lo, band_hi, f0, acc, out)
                _project(power_b, mel_w, band_lo, band_hi, f0 + LANES, acc, out)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _hop_major(audio, total, first, hops, columns):
    """hops[c, r] = padded[(first + r) * HOP + c] for r < columns, the padded signal being the audio, `padding`
    zeros, all reflect-padded by N_FFT / 2 on each side, then zeros. Frame first + f is then row c = j % HOP
    of column f + j // HOP for its sample j: one contiguous run per sample across consecutive frames."""
    n, half = audio.size, N_FFT // 2
    inside_first = min(columns, max(0, (half + HOP - 1) // HOP - first))    # columns wholly inside the audio
    inside_last = max(inside_first, min(columns, (n + half) // HOP - first))
    for r in range(inside_first):
        _hop_column(audio, total, (first + r) * HOP - half, hops, r)
    for r in range(inside_last, columns):
        _hop_column(audio, total, (first + r) * HOP - half, hops, r)
    src = audio[(first + inside_first) * HOP - half:(first + inside_last) * HOP - half]
    for c in range(HOP):
        row = hops[c, inside_first:inside_last]
        for r in range(inside_last - inside_first):
            row[r] = src[r * HOP + c]


@numba.njit(cache=True, nogil=True, fastmath=True)
def _hop_column(audio, total, start, hops, r):
    """One hop-major column at the edges: reflect padding, the zeros of `padding`, zeros past the end."""
    n, half = audio.size, N_FFT // 2
    for c in range(HOP):
        i = start + c
        if i >= total + half:
            hops[c, r] = 0.0
            continue
        if i < 0:
            i = -i
        elif i >= total:
            i = 2 * (total - 1) - i
        hops[c, r] = audio[i] if i < n else 0.0


@numba.njit(cache=True, nogil=True, fastmath=True)
def _frames(hops, f0, window, z):
    """Windowed frames f0.. (real parts) and f0 + LANES.. (imaginary parts) of the chunk into the buffer."""
    for j in range(N_FFT):
        d = f0 + j // HOP
        row = hops[j % HOP, d:d + 2 * LANES]
        w = np.float64(window[j])
        re = z[j * LANES:(j + 1) * LANES]
        im = z[IM + j * LANES:IM + (j + 1) * LANES]
        for lane in range(LANES):
            re[lane] = row[lane] * w
            im[lane] = row[LANES + lane] * w


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dif4(z, n, tw_re, tw_im, off):
    """One radix-4 stage on every sub-transform of length n: x_j = z[b + p + jm], z[b + p + km] =
    w_n^(pk) * sum_j x_j e^(-2 pi i jk / 4), in place."""
    m = n // 4
    for b in range(0, N_FFT, n):
        for p in range(m):
            t = off + 4 * p
            w1r, w1i = tw_re[t + 1], tw_im[t + 1]
            w2r, w2i = tw_re[t + 2], tw_im[t + 2]
            w3r, w3i = tw_re[t + 3], tw_im[t + 3]
            i0 = (b + p) * LANES
            i1 = i0 + m * LANES
            i2 = i1 + m * LANES
            i3 = i2 + m * LANES
            for lane in range(LANES):
                x0r = z[i0 + lane]
                x1r = z[i1 + lane]
                x2r = z[i2 + lane]
                x3r = z[i3 + lane]
                x0i = z[IM + i0 + lane]
                x1i = z[IM + i1 + lane]
                x2i = z[IM + i2 + lane]
                x3i = z[IM + i3 + lane]
                s02r = x0r + x2r
                s02i = x0i + x2i
                d02r = x0r - x2r
                d02i = x0i - x2i
                s13r = x1r + x3r
                s13i = x1i + x3i
                d13r = x1r - x3r
                d13i = x1i - x3i
                z[i0 + lane] = s02r + s13r
                z[IM + i0 + lane] = s02i + s13i
                c1r = d02r + d13i          # x0 - i x1 - x2 + i x3
                c1i = d02i - d13r
                c2r = s02r - s13r
                c2i = s02i - s13i
                c3r = d02r - d13i          # x0 + i x1 - x2 - i x3
                c3i = d02i + d13r
                z[i1 + lane] = c1r * w1r - c1i * w1i
                z[IM + i1 + lane] = c1r * w1i + c1i * w1r
                z[i2 + lane] = c2r * w2r - c2i * w2i
                z[IM + i2 + lane] = c2r * w2i + c2i * w2r
                z[i3 + lane] = c3r * w3r - c3i * w3i
                z[IM + i3 + lane] = c3r * w3i + c3i * w3r


_C1, _C2 = np.cos(2 * np.pi / 5), np.cos(4 * np.pi / 5)
_S1, _S2 = np.sin(2 * np.pi / 5), np.sin(4 * np.pi / 5)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _dif5(z, n, tw_re, tw_im, off):
    """One radix-5 stage, as _dif4 (pairs x1 +- x4 and x2 +- x3 share their products)."""
    m = n // 5
    for b in range(0, N_FFT, n):
        for p in range(m):
            t = off + 5 * p
            w1r, w1i = tw_re[t + 1], tw_im[t + 1]
            w2r, w2i = tw_re[t + 2], tw_im[t + 2]
            w3r, w3i = tw_re[t + 3], tw_im[t + 3]
            w4r, w4i = tw_re[t + 4], tw_im[t + 4]
            i0 = (b + p) * LANES
            i1 = i0 + m * LANES
            i2 = i1 + m * LANES
            i3 = i2 + m * LANES
            i4 = i3 + m * LANES
            for lane in range(LANES):
                x0r = z[i0 + lane]
                x0i = z[IM + i0 + lane]
                t1r = z[i1 + lane] + z[i4 + lane]
                t1i = z[IM + i1 + lane] + z[IM + i4 + lane]
                t2r = z[i2 + lane] + z[i3 + lane]
                t2i = z[IM + i2 + lane] + z[IM + i3 + lane]
                t3r = z[i1 + lane] - z[i4 + lane]
                t3i = z[IM + i1 + lane] - z[IM + i4 + lane]
                t4r = z[i2 + lane] - z[i3 + lane]
                t4i = z[IM + i2 + lane] - z[IM + i3 + lane]
                z[i0 + lane] = x0r + t1r + t2r
                z[IM + i0 + lane] = x0i + t1i + t2i
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
                z[i1 + lane] = c1r * w1r - c1i * w1i
                z[IM + i1 + lane] = c1r * w1i + c1i * w1r
                z[i2 + lane] = c2r * w2r - c2i * w2i
                z[IM + i2 + lane] = c2r * w2i + c2i * w2r
                z[i3 + lane] = c3r * w3r - c3i * w3i
                z[IM + i3 + lane] = c3r * w3i + c3i * w3r
                z[i4 + lane] = c4r * w4r - c4i * w4i
                z[IM + i4 + lane] = c4r * w4i + c4i * w4r


@numba.njit(cache=True, nogil=True, fastmath=True)
def _split_power(z, position, power_a, power_b):
    """Power spectra of the two real frames packed in z = a + ib: A[k] = (Z[k] + conj Z[N-k]) / 2 and
    B[k] = (Z[k] - conj Z[N-k]) / 2i. In float64 the cancellation this can involve costs nothing visible."""
    for k in range(N_BINS):
        ik = position[k] * LANES
        ir = position[(N_FFT - k) % N_FFT] * LANES
        kr, ki = z[ik:ik + LANES], z[IM + ik:IM + ik + LANES]    # views: plain vector loads below
        rr, ri = z[ir:ir + LANES], z[IM + ir:IM + ir + LANES]
        pa = power_a[k]
        pb = power_b[k]
        for lane in range(LANES):
            sr = kr[lane] + rr[lane]
            di = ki[lane] - ri[lane]
            dr = kr[lane] - rr[lane]
            si = ki[lane] + ri[lane]
            pa[lane] = 0.25 * (sr * sr + di * di)
            pb[lane] = 0.25 * (dr * dr + si * si)


@numba.njit(cache=True, nogil=True, fastmath=True)
def _project(power, mel_w, band_lo, band_hi, f0, acc, out):
    """Mel bands of one block: each triangular filter touches at most a dozen bins."""
    lanes = max(0, min(LANES, out.shape[1] - f0))
    if lanes == 0:
        return
    for m in range(mel_w.shape[0]):
        for lane in range(LANES):
            acc[lane] = 0.0
        for k in range(band_lo[m], band_hi[m]):
            w = mel_w[m, k]
            row = power[k]
            for lane in range(LANES):
                acc[lane] += w * row[lane]
        dst = out[m, f0:f0 + lanes]
        for lane in range(lanes):
            dst[lane] = max(acc[lane], np.float32(1e-10))   # the floor before log10


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
    _mel_power(audio, padding, _window(), n_frames, *_twiddles(), _positions(), *_bands(n_mels),
               numba.get_num_threads(), mel)
    np.log10(mel, out=mel)
    _clamp_and_scale(mel, mel.max() - np.float32(8.0))
    return mel


@numba.njit(cache=True, nogil=True, fastmath=True)
def _clamp_and_scale(mel, floor):
    """Whisper's dynamic-range clamp and rescale in one pass: (max(x, floor) + 4) / 4."""
    flat = mel.reshape(-1)
    for i in range(flat.size):
        flat[i] = (max(flat[i], floor) + np.float32(4.0)) * np.float32(0.25)
