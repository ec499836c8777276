#!/usr/bin/env python3
"""GPU benchmark: single-stream and 8/32-stream batched decode through the engine vs raw llama.cpp, and prefill.

Run on a CUDA machine with a CUDA build (../shared/gpu/device.sh makes the random-weight models):
    PGL_GPU_MODEL_1B=/tmp/llama-1b-q4_0.gguf [PGL_GPU_MODEL_8B=...] python benchmarks/bench_gpu.py --out DIR
Writes DIR/gpu-<date>.json with device, decode_ratio_vs_raw, batched_ratio_vs_raw and the tokens/s behind them.
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

from polargrid_local import LocalEngine, Registry
from polargrid_local.gpu import NvmlProbe, cuda_build

from _raw import measure


def engine_rates(path: str, streams: list[int], tokens: int) -> dict:
    toml = Path(f"/tmp/pgl-bench-{os.getpid()}.toml")
    toml.write_text(f'[[models]]\nid = "m"\nkind = "chat"\nlocal = "{path}"\n'
                    f'[models.engine]\nn_ctx = 1024\nn_parallel = {max(streams)}\n')
    engine = LocalEngine(Registry.load(toml), n_gpu_layers=-1)
    request = lambda i, n: {"model": "m", "prompt": ", ".join(str(k) for k in range(i, i + 10)),  # noqa: E731
                            "max_tokens": n, "temperature": 0}
    try:
        engine.completion(request(0, 8))
        stamps = [time.perf_counter() for c in engine.completion_stream(request(1, tokens)) if c.choices]
        out = {"single_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 1)}
        for n in streams:
            scheduler = engine.pool.worker(engine.registry.get("m"))[0].backend.scheduler
            before, started = scheduler.tokens_generated, time.perf_counter()
            threads = [threading.Thread(target=lambda i=i: engine.completion(request(i * 50, tokens))) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            out[f"batched_{n}_tok_s"] = round((scheduler.tokens_generated - before) / (time.perf_counter() - started), 1)
        return out
    finally:
        engine.close()
        toml.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--streams", default="8,32")
    args = parser.parse_args()
    devices = NvmlProbe().devices()
    if not (cuda_build() and devices):
        print(json.dumps({"benchmark": "gpu", "skipped": "needs a CUDA device and a CUDA build"}))
        return 0
    streams = [int(s) for s in args.streams.split(",")]
    result: dict = {"benchmark": "gpu", "device": devices[0].name, "date": datetime.date.today().isoformat(),
                    "models": {}}
    for label in ("1B", "8B"):
        path = os.environ.get(f"PGL_GPU_MODEL_{label}")
        if not path or not os.path.exists(path):
            continue
        raw = {"single_tok_s": statistics.median(measure(path, 8, "single", tokens=args.tokens, repeats=3,
                                                          n_gpu_layers=-1))}
        for n in streams:
            raw[f"batched_{n}_tok_s"] = statistics.median(measure(path, 8, "batched", n_seq=n, prompt_len=32,
                                                                  tokens=args.tokens, repeats=2, n_gpu_layers=-1))
        ours = engine_rates(path, streams, args.tokens)
        result["models"][label] = {"raw": {k: round(v, 1) for k, v in raw.items()}, "engine": ours,
                                   "decode_ratio_vs_raw": round(ours["single_tok_s"] / raw["single_tok_s"], 3),
                                   **{f"batched_{n}_ratio_vs_raw": round(ours[f"batched_{n}_tok_s"] /
                                                                         raw[f"batched_{n}_tok_s"], 3) for n in streams}}
    first = next(iter(result["models"].values()), None)
    if first:
        result["decode_ratio_vs_raw"] = first["decode_ratio_vs_raw"]
        result["batched_ratio_vs_raw"] = first.get("batched_8_ratio_vs_raw")
        result["raw_decode_tok_s"], result["engine_decode_tok_s"] = first["raw"]["single_tok_s"], first["engine"]["single_tok_s"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{result['date']}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
