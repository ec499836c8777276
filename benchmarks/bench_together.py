#!/usr/bin/env python3
"""Many models, one process: does a chat model keep its speed with other models loaded beside it?

Single-stream chat decode tokens/s (SmolLM2-135M, greedy, the same prompt and token count everywhere) with the
chat model alone, then with an embedding model loaded and idle, a second chat model loaded and idle, whisper
and piper loaded and idle; and while an embeddings loop or a transcription runs beside it, where it reports
both jobs' rates as fractions of their rates alone and their sum (the share of the machine's work kept).
Each case runs in a fresh process, the cases alternate over the rounds, and every ratio is against the
"alone" figures of the same run. ``--lanes on,off`` runs each case with the compute lane and without it
(POLARGRID_LOCAL_COMPUTE_LANE=0: each model computes on its own thread, as before the lane).

The log-mel kernel is measured too: alone, right after faster-whisper's FeatureExtractor (numpy), and while a
transcription runs.

    python benchmarks/bench_together.py [--rounds 3] [--lanes on,off] [--quick] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

CHAT = "smollm2-135m-instruct"
EMBED = "all-minilm-l6-v2"
PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"
CASES = ("alone", "embed-idle", "chat2-idle", "speech-idle", "embed-busy", "stt-busy", "embed-alone", "stt-alone",
         "logmel")


# -- one case, in its own process -----------------------------------------------------------------

def _engine(tmp: Path, threads: int):
    from polargrid_local import LocalEngine, Registry

    registry = Registry.load()
    gguf = registry.get(CHAT).path_in(registry.cache_dir)
    models = tmp / "models.toml"   # a second chat model: another context on the same weights file
    models.write_text(f'[[models]]\nid = "second-chat"\nkind = "chat"\nlocal = "{gguf}"\n'
                      '[models.engine]\nn_ctx = 2048\n')
    return LocalEngine(models, n_threads=threads, n_gpu_layers=0)


def _decode_rate(engine, tokens: int) -> float:
    stamps = []
    for chunk in engine.completion_stream({"model": CHAT, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please call me back before five o'clock tomorrow.",
             "It was a bright cold day in April and the clocks were striking thirteen."]


def _speech(engine) -> bytes:
    return engine.text_to_speech({"model": "tts-1", "input": " ".join(SENTENCES * 3), "voice": "alloy",
                                  "response_format": "wav"})


def _neighbour_once(engine, kind: str, done: list[float], audio: bytes | None) -> None:
    """One unit of the neighbour's work; appends its rate (inputs embedded, or audio seconds heard, per second)."""
    texts = [f"Sentence number {i} about the weather, the sea and the city at night." for i in range(8)]
    started = time.perf_counter()
    if kind == "embed":
        engine.embeddings({"model": EMBED, "input": texts})
        done.append(len(texts) / (time.perf_counter() - started))
    else:
        reply = engine.transcribe(audio, {"model": "whisper-1", "language": "en", "response_format": "verbose_json"})
        done.append(reply.duration / (time.perf_counter() - started))


def _neighbour(engine, kind: str, stop: threading.Event, done: list[float], audio: bytes | None) -> None:
    while not stop.is_set():
        _neighbour_once(engine, kind, done, audio)


def run_case(case: str, tokens: int, repeats: int, threads: int) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        engine = _engine(Path(tmp), threads)
        try:
            return _case(engine, case, tokens, repeats)
        finally:
            engine.close()


def _case(engine, case: str, tokens: int, repeats: int) -> dict:
    out: dict = {"case": case}
    if case == "logmel":
        return _logmel(engine)
    audio = _speech(engine) if case in ("speech-idle", "stt-busy", "stt-alone") else None
    if case in ("embed-alone", "stt-alone"):
        kind = "embed" if case == "embed-alone" else "stt"
        _neighbour_once(engine, kind, [], audio)   # loaded and warm
        done: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < 6.0 or len(done) < 3:
            _neighbour_once(engine, kind, done, audio)
        out["neighbour_rate"] = statistics.median(done)
        return out
    _decode_rate(engine, 16)                     # the chat model loaded and warm
    if case.endswith("-idle"):   # alone first, in the same process: a fresh process's own speed varies by +-15%
        out["paired_alone_tok_s"] = statistics.median(_decode_rate(engine, tokens) for _ in range(repeats))
    if case == "embed-idle":
        engine.embeddings({"model": EMBED, "input": ["warm up the embedding model"]})
    elif case == "chat2-idle":
        engine.completion({"model": "second-chat", "prompt": PROMPT, "max_tokens": 8, "temperature": 0})
    elif case == "speech-idle":
        engine.transcribe(audio, {"model": "whisper-1", "language": "en"})
    if case in ("embed-busy", "stt-busy"):
        kind = "embed" if case == "embed-busy" else "stt"
        _neighbour_once(engine, kind, [], audio)   # loaded and warm before the clock starts
        stop, done = threading.Event(), []
        thread = threading.Thread(target=_neighbour, args=(engine, kind, stop, done, audio), daemon=True)
        thread.start()
        time.sleep(0.5)
        rates = [_decode_rate(engine, tokens) for _ in range(repeats)]
        stop.set()
        thread.join(120)
        out["neighbour_rate"] = statistics.median(done) if done else 0.0
    else:
        rates = [_decode_rate(engine, tokens) for _ in range(repeats)]
    out["chat_tok_s"] = statistics.median(rates)
    out["chat_runs"] = [round(r, 1) for r in rates]
    return out


def _logmel(engine) -> dict:
    """The log-mel kernel on 60 s of audio: alone, right after FeatureExtractor (numpy), during a transcription."""
    import numpy as np
    from faster_whisper.feature_extractor import FeatureExtractor

    from polargrid_local.kernels import log_mel_spectrogram
    from polargrid_local.runtime.compute import on_lane

    audio = np.random.default_rng(0).standard_normal(16000 * 60).astype(np.float32) * 0.1

    def kernel_ms(calls: int = 10) -> float:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            on_lane(log_mel_spectrogram, audio, 80)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)

    kernel_ms(3)
    alone = statistics.median(kernel_ms() for _ in range(3))
    extractor = FeatureExtractor(feature_size=80)
    after = []
    for _ in range(3):
        extractor(audio)
        after.append(kernel_ms())
    speech = _speech(engine)
    stop, done = threading.Event(), []
    thread = threading.Thread(target=_neighbour, args=(engine, "stt", stop, done, speech), daemon=True)
    thread.start()
    time.sleep(1.0)
    during = [kernel_ms() for _ in range(3)]
    stop.set()
    thread.join(120)
    return {"case": "logmel", "alone_ms": alone, "after_feature_extractor_ms": statistics.median(after),
            "during_transcription_ms": statistics.median(during)}


# -- the driver -----------------------------------------------------------------------------------

def _spawn(case: str, lane: str, args) -> dict:
    env = {**os.environ, "POLARGRID_LOCAL_COMPUTE_LANE": "1" if lane == "on" else "0"}
    cmd = [sys.executable, __file__, "--case", case, "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"case {case} (lane {lane}) failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(results: dict[str, dict[str, list[dict]]]) -> dict:
    summary: dict = {}
    for lane, cases in results.items():
        med = {case: {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
               for case, runs in cases.items()}
        alone = med["alone"]["chat_tok_s"]
        row: dict = {"alone_tok_s": round(alone, 1)}
        for case in ("embed-idle", "chat2-idle", "speech-idle"):
            if case in med:
                row[f"{case}_ratio"] = round(med[case]["chat_tok_s"] / alone, 3)
                # the same, against the chat model alone in the same process before the neighbour loaded
                row[f"{case}_paired_ratio"] = round(statistics.median(
                    r["chat_tok_s"] / r["paired_alone_tok_s"] for r in cases[case]), 3)
        for case, base in (("embed-busy", "embed-alone"), ("stt-busy", "stt-alone")):
            if case in med and base in med:
                chat = med[case]["chat_tok_s"] / alone
                neighbour = med[case]["neighbour_rate"] / med[base]["neighbour_rate"]
                row[case] = {"chat_fraction": round(chat, 3), "neighbour_fraction": round(neighbour, 3),
                             "sum": round(chat + neighbour, 3)}
        if "logmel" in med:
            lm = med["logmel"]
            alone_ms = lm["alone_ms"]
            row["logmel"] = {"alone_ms": round(alone_ms, 2),
                             "after_feature_extractor_ratio": round(alone_ms / lm["after_feature_extractor_ms"], 3),
                             "during_transcription_ratio": round(alone_ms / lm["during_transcription_ms"], 3)}
        summary[lane] = row
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lanes", default="on,off")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quick", action="store_true", help="one round, fewer tokens")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.tokens, args.repeats, args.threads)))
        return 0
    if args.quick:
        args.rounds, args.tokens, args.repeats = 1, 96, 2
    lanes = args.lanes.split(",")
    cases = args.cases.split(",")
    results: dict[str, dict[str, list[dict]]] = {lane: {case: [] for case in cases} for lane in lanes}
    for round_ in range(args.rounds):     # alternated: the machine's drift hits every case alike
        for case in cases:
            for lane in (lanes if round_ % 2 == 0 else lanes[::-1]):
                results[lane][case].append(_spawn(case, lane, args))
                print(f"round {round_ + 1} {case} lane={lane}: {results[lane][case][-1]}", file=sys.stderr)
    report = {"benchmark": "together", "model": CHAT, "threads": args.threads, "tokens": args.tokens,
              "rounds": args.rounds, "summary": summarise(results), "raw": results, "cpu_count": os.cpu_count()}
    print(json.dumps(report["summary"]))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
