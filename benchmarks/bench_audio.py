#!/usr/bin/env python3
"""Audio benchmark: kernels vs their baselines, and STT/TTS through PolarGrid vs the engines called directly.

Everything is measured in this one run, on this machine; medians of --repeats runs. Prints one JSON object.

    python benchmarks/bench_audio.py [--repeats 7] [--only logmel|long|routing] [--long-minutes 10]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from polargrid_local import PolarGridSync
from polargrid_local.audio import decode_audio, log_mel_spectrogram, resample
from polargrid_local.llm.backend import available_cpus

TEXT = ("Edge devices need speech that works offline. This benchmark speaks a few sentences, "
        "then listens to them again. Each sentence is synthesised in turn, so streaming can start early.")


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def speechlike(rate: int, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(rate * seconds)) / rate
    voiced = sum(np.sin(2 * np.pi * f * t) / k for k, f in enumerate((140, 280, 420, 700, 1100, 2400, 3300), 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.1 * voiced * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def paired_times(fns: dict, repeats: int) -> dict:
    """Seconds of each run of each function, the runs interleaved so that load on the machine hits all alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    return times


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def bench_logmel(repeats: int, busy_neighbour: bool = False) -> dict:
    """Our kernel against faster-whisper's FeatureExtractor, both on 1 thread, then both on all threads
    (numba threads for ours; numpy's BLAS/FFT threads for theirs, pinned with threadpoolctl).
    With busy_neighbour, another process spins on a core all the while, as decoding would on a server."""
    if busy_neighbour:
        import multiprocessing

        stop = multiprocessing.Event()
        spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
        spinner.start()
        try:
            return {"busy_neighbour": True, **bench_logmel(repeats)}
        finally:
            stop.set()
            spinner.join()
    import numba
    from faster_whisper.feature_extractor import FeatureExtractor
    from threadpoolctl import threadpool_limits

    from polargrid_local.kernels import log_mel_spectrogram_numpy

    audio = speechlike(16000, 60)
    extractor = FeatureExtractor(feature_size=80)
    ours = log_mel_spectrogram(audio, 80)
    if (os.environ.get("NUMBA_NUM_THREADS") or "").strip() == "1":
        print("note: NUMBA_NUM_THREADS=1 pins numba to one thread; 'all_threads' is then 1 too", file=sys.stderr)
    result: dict = {"audio_s": 60, "max_abs_diff_vs_faster_whisper": float(np.abs(ours - extractor(audio)).max()),
                    "max_abs_diff_vs_numpy_reference": float(np.abs(ours - log_mel_spectrogram_numpy(audio)).max())}
    everything = numba.config.NUMBA_NUM_THREADS
    for label, threads in (("1_thread", 1), ("all_threads", everything)):
        numba.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            t = paired_times({"ours": lambda: log_mel_spectrogram(audio, 80), "theirs": lambda: extractor(audio)},
                             repeats)
        ours, theirs = statistics.median(t["ours"]), statistics.median(t["theirs"])
        result[label] = {"threads": threads, "ours_ms": round(ours * 1e3, 2), "faster_whisper_ms": round(theirs * 1e3, 2),
                         "speedup_vs_faster_whisper": round(theirs / ours, 2),
                         "ours_best_ms": round(min(t["ours"]) * 1e3, 2),
                         "faster_whisper_best_ms": round(min(t["theirs"]) * 1e3, 2),
                         "speedup_best_of_runs": round(min(t["theirs"]) / min(t["ours"]), 2)}
    numba.set_num_threads(everything)
    return result


def _pyav_resample(x: np.ndarray, orig: int, target: int) -> np.ndarray:
    import av

    resampler = av.AudioResampler(format="flt", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(x[None, :], format="flt", layout="mono")
    frame.sample_rate = orig
    out = [f.to_ndarray() for f in resampler.resample(frame)] + [f.to_ndarray() for f in resampler.resample(None)]
    return np.concatenate(out, axis=1)[0]


def _snr(ours: np.ndarray, reference: np.ndarray) -> float:
    n = min(ours.size, reference.size)
    core = slice(n // 10, n - n // 10)
    return float(10 * np.log10(np.sum(reference[core] ** 2) / np.sum((ours[core] - reference[core]) ** 2)))


def bench_resample(repeats: int) -> dict:
    import soxr

    out = {}
    for orig, target in ((44100, 16000), (22050, 24000), (48000, 16000)):
        x = speechlike(orig, 60)
        vhq = soxr.resample(x, orig, target, quality="VHQ")
        ours = median_time(lambda: resample(x, orig, target), repeats)
        soxr_vhq = median_time(lambda: soxr.resample(x, orig, target, quality="VHQ"), repeats)
        soxr_hq = median_time(lambda: soxr.resample(x, orig, target, quality="HQ"), repeats)
        pyav = median_time(lambda: _pyav_resample(x, orig, target), repeats)
        out[f"{orig}->{target}"] = {
            "audio_s": 60, "ours_ms": round(ours * 1e3, 2), "soxr_vhq_ms": round(soxr_vhq * 1e3, 2),
            "soxr_hq_ms": round(soxr_hq * 1e3, 2), "pyav_ms": round(pyav * 1e3, 2),
            "speed_vs_pyav": round(pyav / ours, 2), "speed_vs_soxr_vhq": round(soxr_vhq / ours, 2),
            "snr_db_vs_soxr_vhq": round(_snr(resample(x, orig, target), vhq), 1),
            "pyav_snr_db_vs_soxr_vhq": round(_snr(_pyav_resample(x, orig, target), vhq), 1)}
    return out


def bench_stt(client: PolarGridSync, wav: bytes, path: str, repeats: int) -> dict:
    from faster_whisper import WhisperModel

    duration = decode_audio(wav, 16000).duration
    client.transcribe(wav, {"model": "whisper-1"})
    ours = median_time(lambda: client.transcribe(wav, {"model": "whisper-1"}), repeats)
    registry = client.engine.registry
    model = WhisperModel(str(registry.get("whisper-1").path_in(registry.cache_dir)), device="cpu",
                         compute_type="int8", cpu_threads=available_cpus())
    direct = median_time(lambda: list(model.transcribe(path, beam_size=5, vad_filter=False)[0]), repeats)
    return {"audio_s": round(duration, 2), "ours_rtf": round(ours / duration, 4),
            "faster_whisper_rtf": round(direct / duration, 4), "ratio_vs_direct": round(direct / ours, 3)}


def bench_tts(client: PolarGridSync, repeats: int) -> dict:
    from piper import PiperVoice

    registry = client.engine.registry
    voice = PiperVoice.load(str(registry.get("tts-1").path_in(registry.cache_dir)))
    request = {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "pcm"}
    pcm = client.text_to_speech(request)
    duration = len(pcm) / 2 / 24000
    ours = median_time(lambda: client.text_to_speech(request), repeats)
    direct = median_time(lambda: [c.audio_int16_bytes for c in voice.synthesize(TEXT)], repeats)
    firsts, totals = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        first = None
        for _chunk in client.text_to_speech_stream({**request, "response_format": "opus"}):
            first = first or time.perf_counter() - started
        firsts.append(first)
        totals.append(time.perf_counter() - started)
    return {"audio_s": round(duration, 2), "ours_rtf": round(ours / duration, 4),
            "piper_rtf": round(direct / duration, 4), "ratio_vs_direct": round(direct / ours, 3),
            "stream_first_audio_s": round(statistics.median(firsts), 3),
            "stream_total_s": round(statistics.median(totals), 3)}


LONG_SENTENCES = [
    "Edge devices need speech that works offline.", "The quick brown fox jumps over the lazy dog.",
    "Please call me back before five o'clock tomorrow.", "It was a bright cold day in April.",
    "The library opens at nine and closes at six on weekdays.", "She bought three apples and a loaf of bread.",
    "Our train was delayed by twenty minutes this morning.", "The meeting has been moved to the second floor.",
    "He plays the piano every evening after dinner.", "Remember to water the plants while I am away.",
    "The weather tomorrow will be windy with light rain.", "They walked along the river until the sun went down.",
    "Turn left at the next corner and keep going straight.", "The children built a small castle out of sand.",
    "Please send me the report by the end of the week.", "A cup of hot tea is perfect on a cold day.",
]


def _wer(reference: str, hypothesis: str) -> float:
    def words(text):
        return "".join(c.lower() if c.isalnum() or c.isspace() else " " for c in text).split()

    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(1, len(ref))


def long_speech(client: PolarGridSync, minutes: float) -> tuple[np.ndarray, str]:
    """Synthetic speech, sentences with half-second pauses, tiled to ``minutes``; and its text."""
    pieces = [decode_audio(client.text_to_speech({"model": "tts-1", "input": s, "voice": "alloy",
                                                  "response_format": "wav"}), 16000).samples for s in LONG_SENTENCES]
    gap = np.zeros(8000, np.float32)
    unit = np.concatenate([p for piece in pieces for p in (piece, gap)])
    copies = max(1, int(np.ceil(minutes * 60 * 16000 / unit.size)))
    return np.tile(unit, copies), " ".join(LONG_SENTENCES * copies)


def bench_long_audio(client: PolarGridSync, minutes: float) -> dict:
    """10 minutes of speech: faster-whisper's sequential decoding (the old path: no VAD) against VAD-cut
    chunks in its BatchedInferencePipeline (ours for long audio), same model, same run; then ours end to end."""
    from faster_whisper import BatchedInferencePipeline

    audio, text = long_speech(client, minutes)
    duration = audio.size / 16000
    engine = client.engine
    spec = engine.registry.get("whisper-1")
    worker, _ = engine.pool.worker(spec)
    model = worker.backend.model
    result: dict = {"audio_s": round(duration, 1), "model": spec.id, "threads": available_cpus()}
    runs = {
        "sequential": lambda: list(model.transcribe(audio, language="en", beam_size=5, vad_filter=False)[0]),
        "sequential_vad": lambda: list(model.transcribe(audio, language="en", beam_size=5, vad_filter=True)[0]),
        "batched_vad": lambda: list(BatchedInferencePipeline(model).transcribe(
            audio, language="en", beam_size=5, vad_filter=True, batch_size=8)[0]),
    }
    for name, run in runs.items():
        started = time.perf_counter()
        segments = run()
        seconds = time.perf_counter() - started
        result[name] = {"seconds": round(seconds, 2), "x_realtime": round(duration / seconds, 1),
                        "wer": round(_wer(text, " ".join(seg.text for seg in segments)), 4)}
    wav = _wav_bytes(audio)
    started = time.perf_counter()
    ours = client.transcribe(wav, {"model": "whisper-1"}).text
    seconds = time.perf_counter() - started
    result["polargrid_whisper_1"] = {"seconds": round(seconds, 2), "x_realtime": round(duration / seconds, 1),
                                     "wer": round(_wer(text, ours), 4)}
    base = result["sequential"]["seconds"]
    result["throughput_ratio_batched_vs_sequential"] = round(base / result["batched_vad"]["seconds"], 2)
    result["throughput_ratio_polargrid_vs_sequential"] = round(base / seconds, 2)
    return result


def _wav_bytes(audio: np.ndarray) -> bytes:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def bench_routing(client: PolarGridSync, wav: bytes, repeats: int) -> dict:
    """What whisper-1's routing costs: language detection on whisper-base (first 30 s), then tiny.en for
    English, against sending everything to whisper-base (which must detect the language itself)."""
    engine = client.engine
    tiny = engine.pool.worker(engine.registry.get("whisper-tiny.en"))[0].backend.model
    base = engine.pool.worker(engine.registry.get("whisper-base"))[0].backend.model
    audio = decode_audio(wav, 16000).samples
    t = paired_times({
        "detect": lambda: base.detect_language(audio[: 30 * 16000]),
        "tiny_en": lambda: list(tiny.transcribe(audio, language="en", beam_size=5)[0]),
        "base_detecting": lambda: list(base.transcribe(audio, beam_size=5)[0]),
        "base_en": lambda: list(base.transcribe(audio, language="en", beam_size=5)[0]),
        "polargrid_whisper_1": lambda: client.transcribe(wav, {"model": "whisper-1"}),
    }, repeats)
    ms = {name: round(statistics.median(v) * 1e3, 1) for name, v in t.items()}
    routed = ms["detect"] + ms["tiny_en"]
    return {"audio_s": round(audio.size / 16000, 2), "median_ms": ms,
            "english_routed_ms": round(routed, 1), "english_all_to_base_ms": ms["base_detecting"],
            "ratio_all_to_base_vs_routed": round(ms["base_detecting"] / routed, 2),
            "other_language_routed_ms": round(ms["detect"] + ms["base_en"], 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", choices=["logmel", "long", "routing"], help="run one part only")
    parser.add_argument("--long-minutes", type=float, default=10.0)
    args = parser.parse_args()
    if args.only == "logmel":
        print(json.dumps({"benchmark": "audio", "logmel": bench_logmel(args.repeats),
                          "logmel_busy_neighbour": bench_logmel(args.repeats, busy_neighbour=True)}))
        return 0
    if args.only in ("long", "routing"):
        with PolarGridSync() as client:
            if args.only == "long":
                part = bench_long_audio(client, args.long_minutes)
            else:
                wav = client.text_to_speech({"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"})
                part = bench_routing(client, wav, args.repeats)
        print(json.dumps({"benchmark": "audio", args.only: part}))
        return 0
    result = {"benchmark": "audio", "threads": available_cpus(), "logmel": bench_logmel(args.repeats),
              "resample": bench_resample(args.repeats)}
    with PolarGridSync() as client:
        wav = client.text_to_speech({"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"})
        path = "/tmp/polargrid-bench-speech.wav"
        with open(path, "wb") as f:
            f.write(wav)
        result["stt"] = bench_stt(client, wav, path, max(3, args.repeats // 2))
        result["tts"] = bench_tts(client, max(3, args.repeats // 2))
        result["routing"] = bench_routing(client, wav, max(3, args.repeats // 2))
        result["long_audio"] = bench_long_audio(client, args.long_minutes)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
