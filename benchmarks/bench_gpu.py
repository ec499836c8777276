#!/usr/bin/env python3
"""GPU benchmark: single-stream and 8/32-stream batched decode through the engine vs raw llama.cpp.

Run on a CUDA machine with a CUDA build (../shared/gpu/device.sh makes the random-weight models):
    PGL_GPU_MODEL_1B=/tmp/llama-1b-q4_0.gguf [PGL_GPU_MODEL_8B=...] python benchmarks/bench_gpu.py --out DIR
Writes DIR/gpu-<date>.json with device, decode_ratio_vs_raw, batched_ratio_vs_raw and the tokens/s behind them.

Like for like: both sides get the same threads, prompts of the same length in tokens, the same number of runs
and the same statistic (median), and both count decode only: the engine's single stream from its second token,
its batched streams in the window where every stream is generating (as raw decodes after its prefill).
``--cpu`` runs the same comparison on the CPU (to check the benchmark itself where there is no GPU).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from _raw import measure, prompt_tokens

from polargrid_local import LocalEngine, Registry
from polargrid_local.host.gpu import NvmlProbe, cuda_build
from polargrid_local.llm.backend import available_cpus


def counting_prompt(start: int) -> str:
    """Ten numbers counting up from start (all four digits, so every prompt has the same length in tokens)."""
    return ", ".join(str(k) for k in range(start, start + 10))


def single_start(run: int) -> int:
    return 1000 + run


def batched_start(run: int, stream: int) -> int:
    return 1100 + run * 2000 + stream * 50


def window_rate(arrivals: list[list[float]]) -> float:
    """Tokens/s while every stream is generating: after the last first token, until the first stream ends."""
    t0, t1 = max(a[0] for a in arrivals), min(a[-1] for a in arrivals)
    inside = sum(1 for a in arrivals for x in a if t0 < x <= t1)
    return inside / (t1 - t0) if t1 > t0 else 0.0


def engine_rates(path: str, streams: list[int], tokens: int, threads: int, runs: int, gpu_layers: int) -> dict:
    toml = Path(f"/tmp/pgl-bench-{os.getpid()}.toml")
    toml.write_text(f'[[models]]\nid = "m"\nkind = "chat"\nlocal = "{path}"\n'
                    f'[models.engine]\nn_ctx = 1024\nn_parallel = {max(streams)}\n')
    engine = LocalEngine(Registry.load(toml), n_gpu_layers=gpu_layers, n_threads=threads)
    request = lambda start, n: {"model": "m", "prompt": counting_prompt(start), "max_tokens": n,  # noqa: E731
                                "temperature": 0}

    def arrivals(start: int, n: int) -> list[float]:
        return [time.perf_counter() for c in engine.completion_stream(request(start, n)) if c.choices and c.choices[0].text]

    try:
        engine.completion(request(9000, 8))  # load and warm up
        single = []
        for run in range(runs):
            stamps = arrivals(single_start(run), tokens)
            single.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        out = {"single_tok_s": round(statistics.median(single), 1)}
        for n in streams:
            rates = []
            for run in range(runs):
                stamps: dict[int, list[float]] = {}
                threads_ = [threading.Thread(target=lambda i=i: stamps.__setitem__(i, arrivals(batched_start(run, i), tokens)))
                            for i in range(n)]
                for t in threads_:
                    t.start()
                for t in threads_:
                    t.join()
                rates.append(window_rate(list(stamps.values())))
            out[f"batched_{n}_tok_s"] = round(statistics.median(rates), 1)
        return out
    finally:
        engine.close()
        toml.unlink(missing_ok=True)


def raw_rates(path: str, streams: list[int], tokens: int, threads: int, runs: int, gpu_layers: int) -> dict:
    single_len = prompt_tokens(path, [counting_prompt(single_start(r)) for r in range(runs)])
    out = {"single_tok_s": statistics.median(measure(path, threads, "single", prompt_len=single_len, tokens=tokens,
                                                     repeats=runs, n_gpu_layers=gpu_layers))}
    for n in streams:
        batched_len = prompt_tokens(path, [counting_prompt(batched_start(0, i)) for i in range(n)])
        out[f"batched_{n}_tok_s"] = statistics.median(measure(path, threads, "batched", n_seq=n, prompt_len=batched_len,
                                                              tokens=tokens, repeats=runs, n_gpu_layers=gpu_layers))
    out["prompt_tokens"] = single_len
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="8,32")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure, each side; the median is reported")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="CPU threads, both sides")
    parser.add_argument("--cpu", action="store_true", help="no GPU: run the comparison on the CPU (model: "
                        "PGL_GPU_MODEL_1B or the pulled SmolLM2)")
    args = parser.parse_args()
    devices = NvmlProbe().devices()
    if not args.cpu and not (cuda_build() and devices):
        print(json.dumps({"benchmark": "gpu", "skipped": "needs a CUDA device and a CUDA build (or --cpu)"}))
        return 0
    gpu_layers = 0 if args.cpu else -1
    streams = [int(s) for s in args.streams.split(",")]
    result: dict = {"benchmark": "gpu", "device": "cpu" if args.cpu else devices[0].name,
                    "date": datetime.date.today().isoformat(), "threads": args.threads, "runs": args.runs,
                    "statistic": "median", "models": {}}
    models = {label: os.environ.get(f"PGL_GPU_MODEL_{label}") for label in ("1B", "8B")}
    if args.cpu and not models["1B"]:
        registry = Registry.load()
        models["1B"] = str(registry.get("smollm2").path_in(registry.cache_dir))
    for label, path in models.items():
        if not path or not os.path.exists(path):
            continue
        raw = raw_rates(path, streams, args.tokens, args.threads, args.runs, gpu_layers)
        ours = engine_rates(path, streams, args.tokens, args.threads, args.runs, gpu_layers)
        result["models"][label] = {"raw": {k: round(v, 1) for k, v in raw.items()}, "engine": ours,
                                   "decode_ratio_vs_raw": round(ours["single_tok_s"] / raw["single_tok_s"], 3),
                                   **{f"batched_{n}_ratio_vs_raw": round(ours[f"batched_{n}_tok_s"] /
                                                                         raw[f"batched_{n}_tok_s"], 3) for n in streams}}
    first = next(iter(result["models"].values()), None)
    if first:
        result["decode_ratio_vs_raw"] = first["decode_ratio_vs_raw"]
        result["batched_ratio_vs_raw"] = first.get(f"batched_{streams[0]}_ratio_vs_raw")
        result["raw_decode_tok_s"], result["engine_decode_tok_s"] = first["raw"]["single_tok_s"], first["engine"]["single_tok_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{result['device'] if args.cpu else 'cuda'}-{result['date']}.json".replace(" ", "_")).write_text(
        json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
