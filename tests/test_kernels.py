"""Numba kernels against their numpy references, soxr, and faster-whisper's FeatureExtractor."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest

from polargrid_local import audio
from polargrid_local.kernels import (
    log_mel_spectrogram,
    log_mel_spectrogram_numpy,
    resample,
    resample_numpy,
    to_mono,
    to_mono_numpy,
)
from polargrid_local.kernels.resample import Resampler

resample_module = importlib.import_module("polargrid_local.kernels.resample")
RNG = np.random.default_rng(7)


def tones(rate: int, seconds: float, freqs=(440.0, 3000.0, 6500.0)) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return sum(0.2 * np.sin(2 * np.pi * f * t) for f in freqs if f < 0.45 * rate).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64, np.uint8])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_to_mono_matches_reference(dtype, channels):
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = RNG.integers(info.min, info.max, size=997 * channels, endpoint=True).astype(dtype)
    else:
        data = RNG.uniform(-1, 1, size=997 * channels).astype(dtype)
    out = to_mono(data, channels)
    assert out.dtype == np.float32 and out.shape == (997,)
    np.testing.assert_allclose(out, to_mono_numpy(data, channels), atol=1e-6)
    assert np.abs(out).max() <= 1.0
    np.testing.assert_array_equal(to_mono(data.reshape(-1, channels)), out)


def test_to_mono_rejects_bad_shapes():
    with pytest.raises(ValueError, match="channels"):
        to_mono(np.zeros(5, np.int16), 2)
    with pytest.raises(ValueError, match="unsupported sample type"):
        to_mono(np.zeros(4, np.complex64), 1)


RATE_PAIRS = [(22050, 16000), (44100, 16000), (48000, 16000), (8000, 16000), (22050, 24000), (16000, 48000),
              (44100, 16001), (11025, 16000)]


@pytest.mark.parametrize("orig, target", RATE_PAIRS)
def test_resample_matches_reference_soxr_and_streams(orig, target):
    import soxr

    x = tones(orig, 0.5)
    ours = resample(x, orig, target)
    assert ours.dtype == np.float32 and ours.size == -(-x.size * target // orig)
    np.testing.assert_allclose(ours, resample_numpy(x, orig, target), atol=2e-6)
    reference = soxr.resample(x, orig, target, quality="VHQ")
    n = min(ours.size, reference.size)
    core = slice(n // 10, n - n // 10)
    snr = 10 * np.log10(np.sum(reference[core] ** 2) / np.sum((ours[core] - reference[core]) ** 2))
    assert snr > 70, f"SNR vs soxr VHQ only {snr:.1f} dB"
    stream = Resampler(orig, target)
    pieces = [stream.process(c) for c in np.array_split(x, 13)] + [stream.flush()]
    np.testing.assert_array_equal(np.concatenate(pieces), ours)


def test_resample_removes_what_the_target_cannot_hold():
    x = tones(48000, 0.5, freqs=(1000.0, 12000.0))       # 12 kHz is above 16 kHz's Nyquist
    y = resample(x, 48000, 16000)
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    freqs = np.fft.rfftfreq(y.size, 1 / 16000)
    alias = spectrum[np.abs(freqs - 4000) < 50].max()      # 12 kHz would fold to 4 kHz
    assert alias < 1e-3 * spectrum[np.abs(freqs - 1000) < 50].max()


def test_resample_odd_rate_pair_without_a_table(monkeypatch):
    monkeypatch.setattr(resample_module, "MAX_TABLE", 10)
    x = tones(44100, 0.1)
    np.testing.assert_allclose(resample(x, 44100, 16001), resample_numpy(x, 44100, 16001), atol=2e-5)


def test_resample_edge_cases():
    x = tones(16000, 0.1)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    assert resample(np.zeros(0, np.float32), 22050, 16000).size == 0
    with pytest.raises(ValueError):
        resample(x, 0, 16000)
    with pytest.raises(ValueError):
        resample(np.zeros((2, 10), np.float32), 22050, 16000)


@pytest.mark.parametrize("n_mels", [80, 128])
@pytest.mark.parametrize("seconds", [0.05, 1.0, 31.7, 60.0])
def test_log_mel_matches_faster_whisper(n_mels, seconds):
    from faster_whisper.feature_extractor import FeatureExtractor

    x = (RNG.standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32) + tones(16000, seconds)
    if seconds == 60.0:  # speech-like: harmonics under a 3 Hz envelope that falls to silence, quiet noise
        t = np.arange(x.size) / 16000
        voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700, 1100, 2400), 1))
        x = (0.1 * voiced * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + 0.01 * RNG.standard_normal(x.size)).astype(
            np.float32)
    ours = audio.log_mel_spectrogram(x, n_mels=n_mels)
    theirs = FeatureExtractor(feature_size=n_mels)(x)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    # faster-whisper's float32 FFT is itself up to ~7e-6 from the float64 reference; ours is within 1e-6 of it
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours, log_mel_spectrogram_numpy(x, n_mels), rtol=0, atol=1e-6)


def test_log_mel_of_silence_and_bad_input():
    from faster_whisper.feature_extractor import FeatureExtractor

    silence = np.zeros(16000, np.float32)
    np.testing.assert_allclose(log_mel_spectrogram(silence), FeatureExtractor(80)(silence), atol=1e-6)
    for n in (401, 560, 16000 * 3 + 77):      # every block shape: partial blocks, one frame in the last pair
        x = RNG.standard_normal(n).astype(np.float32)
        np.testing.assert_allclose(log_mel_spectrogram(x), log_mel_spectrogram_numpy(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_log_mel_across_chunk_boundaries(threads):
    """The kernel lays the signal out hop-major a chunk of 512 frames at a time, each worker its own chunks:
    frames on either side of a chunk edge, and the reflect padding at both ends, must match the reference."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for n in (160 * 510, 160 * 511 - 1, 160 * 511, 160 * 1023 + 159, 160 * 1536 + 1):
            x = RNG.standard_normal(n).astype(np.float32)
            np.testing.assert_allclose(log_mel_spectrogram(x), log_mel_spectrogram_numpy(x), rtol=0, atol=1e-6)
    finally:
        numba.set_num_threads(before)
    with pytest.raises(ValueError):
        log_mel_spectrogram(np.zeros((2, 100), np.float32))


def test_compiled_kernels_are_cached_on_disk():
    code = ("import json, numpy as np\n"
            "import importlib\n"
            "logmel, resample, mono = (importlib.import_module('polargrid_local.kernels.' + m)\n"
            "                          for m in ('logmel', 'resample', 'mono'))\n"
            "logmel.log_mel_spectrogram(np.zeros(16000, np.float32))\n"
            "resample.resample(np.zeros(1000, np.float32), 22050, 16000)\n"
            "mono.to_mono(np.zeros(10, np.int16), 2)\n"
            "fns = [logmel._mel_power, resample._polyphase, mono._mono_kernel]\n"
            "print(json.dumps([sum(f.stats.cache_hits.values()) for f in fns]))\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # fills the cache if cold
    second = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    hits = json.loads(second.stdout.strip().splitlines()[-1])
    assert all(h >= 1 for h in hits), f"kernels compiled again in a second process: {hits}"


@pytest.mark.parametrize("rate", [0.25, 0.5, 0.8, 1.5, 2.0, 4.0])
def test_time_stretch_matches_reference_and_scales_exactly(rate):
    from polargrid_local.kernels import time_stretch, time_stretch_numpy

    x = tones(22050, 0.7, freqs=(220.0, 660.0))
    y = time_stretch(x, rate, 22050)
    assert y.size == round(x.size / rate)
    np.testing.assert_allclose(y, time_stretch_numpy(x, rate, 22050), atol=1e-5)
    spectrum = np.abs(np.fft.rfft(y[len(y) // 4: 3 * len(y) // 4] * np.hanning(len(y) // 2)))
    freqs = np.fft.rfftfreq(len(y) // 2, 1 / 22050)
    peaks = {round(freqs[i] / 220.0) for i in np.argsort(spectrum)[-6:]}
    assert peaks == {1, 3}, "pitch must not change: the tones stay at 220 and 660 Hz"
    with pytest.raises(ValueError):
        time_stretch(x, 5.0, 22050)
