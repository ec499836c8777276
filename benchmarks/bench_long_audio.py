"""Memory of one long transcription: peak RSS growth while transcribing silent FLAC of 10 min and 1 h, in
windows (the default) and, as the baseline in the same run, as one window holding the whole file (what every
transcription did before issue 22 item 15).

    python benchmarks/bench_long_audio.py [--quick] [--minutes 10 60] [--speech-minutes 0]

Each figure comes from a fresh process: the engine loads whisper-1 and transcribes a 5 s clip first, then the
peak resident memory (VmHWM, reset through /proc/self/clear_refs; else VmRSS sampled every 10 ms) is measured
over the one transcription. Prints JSON: MB of growth and seconds per duration and mode, and the ratio
windowed / whole. ``--speech-minutes N`` adds N minutes of speech (the test sentences with pauses), which
whisper really decodes (slow on a CPU: minutes per 10 min of audio). Full run: about 3 minutes; --quick
(2 and 10 min): under a minute.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

CHILD = "--child"


def flac(seconds: int, speech: bool) -> bytes:
    import io

    import av
    import numpy as np

    pattern = np.zeros(16000 * 10, np.int16)
    if speech:
        from polargrid_local import PolarGridSync
        from polargrid_local.audio import decode_audio

        pg = PolarGridSync()
        said = decode_audio(pg.text_to_speech({"model": "tts-1", "voice": "alloy", "response_format": "wav",
                                               "input": "The quick brown fox jumps over the lazy dog."})).samples
        pg.close()
        pattern = np.concatenate([said, np.zeros(16000 * 2, np.float32)])
        pattern = (np.clip(pattern, -1, 1) * 32767).astype(np.int16)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=16000, layout="mono")
        at = 0
        while at < seconds * 16000:
            piece = pattern[: seconds * 16000 - at]
            frame = av.AudioFrame.from_ndarray(piece[None, :], format="s16", layout="mono")
            frame.sample_rate, frame.pts = 16000, at
            for packet in stream.encode(frame):
                out.mux(packet)
            at += piece.size
        for packet in stream.encode(None):
            out.mux(packet)
    return buffer.getvalue()


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(seconds: int, window: float, speech: bool) -> dict[str, float]:
    from polargrid_local import LocalEngine
    from polargrid_local.limits import Limits

    data = flac(seconds, speech)
    engine = LocalEngine(limits=Limits(transcription_window_s=window, max_audio_seconds=max(3600.0, seconds + 1)))
    try:
        engine.transcribe(flac(5, True), {"model": "whisper-1"})   # loaded, kernels compiled, arenas warm
        before = _status_kb("VmRSS")
        peak = [before]
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")   # resets VmHWM to the current RSS
            exact = True
        except OSError:
            exact = False
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.01):
                peak[0] = max(peak[0], _status_kb("VmRSS"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        text = engine.transcribe(data, {"model": "whisper-1", "response_format": "text"})
        elapsed = time.perf_counter() - started
        stop.set()
        sampler.join()
        high = _status_kb("VmHWM") if exact else peak[0]
        return {"rss_growth_mb": round((max(high, peak[0]) - before) / 1024, 1), "seconds": round(elapsed, 1),
                "words": len(text.split())}
    finally:
        engine.close()


def run(seconds: int, window: float, speech: bool) -> dict[str, float]:
    done = subprocess.run([sys.executable, __file__, CHILD, str(seconds), str(window), str(int(speech))],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        print(json.dumps(child(int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1")))
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, nargs="*", default=[10, 60])
    parser.add_argument("--speech-minutes", type=float, nargs="*", default=[])
    parser.add_argument("--window", type=float, default=120.0, help="transcription_window_s for the windowed runs")
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    minutes = [2, 10] if opts.quick else opts.minutes
    result: dict[str, dict[str, dict[str, float]]] = {}
    for kind, durations, speech in (("silence", minutes, False), ("speech", opts.speech_minutes, True)):
        for m in durations:
            label = f"{kind} {m:g} min"
            windowed = run(int(m * 60), opts.window, speech)
            whole = run(int(m * 60), 1e9, speech)
            result[label] = {"windowed": windowed, "whole_file_baseline": whole,
                             "rss_growth_ratio_windowed_over_whole": round(
                                 windowed["rss_growth_mb"] / max(0.1, whole["rss_growth_mb"]), 3)}
            print(label, result[label], file=sys.stderr, flush=True)
    print(json.dumps({"window_s": opts.window, "results": result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
