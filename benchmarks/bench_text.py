#!/usr/bin/env python3
"""Text benchmark: single-stream decode through PolarGrid vs raw llama.cpp, and cold-start times.

Both sides use the same GGUF, the same thread count and greedy decoding, measured
in this one run. Prints one JSON object.

    python benchmarks/bench_text.py [--model smollm2] [--tokens 128] [--threads N] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _raw import measure

from polargrid_local import PolarGridSync, Registry
from polargrid_local.llm.backend import available_cpus

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def engine_decode(client: PolarGridSync, model: str, n: int) -> tuple[float, int]:
    """Decode tokens/s of one stream (first token excluded: it carries the prefill) and its prompt length."""
    stamps = []
    usage = None
    for chunk in client.completion_stream({"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0},
                                          stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage:
            usage = chunk.usage
    tokens = usage.completion_tokens
    return (tokens - 1) / (stamps[-1] - stamps[0]), usage.prompt_tokens


def cold_start(model: str, threads: int) -> dict[str, float]:
    """A fresh interpreter: import time, and time to the first streamed token (model load included)."""
    code = f"""
import time, json
t0 = time.perf_counter()
import polargrid_local
t1 = time.perf_counter()
client = polargrid_local.PolarGridSync(n_threads={threads})
for chunk in client.chat_completion_stream({{"model": "{model}", "messages": [{{"role": "user", "content": "Hi"}}],
                                             "max_tokens": 4, "temperature": 0}}):
    if chunk.choices and chunk.choices[0].delta.content:
        break
t2 = time.perf_counter()
print(json.dumps({{"import_s": t1 - t0, "first_token_s": t2 - t1}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    registry = Registry.load()
    spec = registry.get(args.model)
    path = str(spec.path_in(registry.cache_dir))
    runs, raw, mixed = [], [], []
    with PolarGridSync(n_threads=args.threads, n_gpu_layers=0) as client:
        engine_decode(client, spec.id, 16)  # load and warm
        for _ in range(args.repeats):       # alternated, so drift in the machine's speed hits both
            runs.append(engine_decode(client, spec.id, args.tokens))
            raw += measure(path, args.threads, "single", prompt_len=runs[-1][1], tokens=args.tokens)
        # the same decode with an embedding model loaded beside it (idle), as a retrieval app has it:
        # a process with one model only is not how the library is used (bench_together.py has more cases)
        client.embeddings({"model": "all-minilm-l6-v2", "input": ["a neighbour, loaded and idle"]})
        for _ in range(args.repeats):
            mixed.append(engine_decode(client, spec.id, args.tokens)[0])
    prompt_len = runs[0][1]
    engine = statistics.median(r[0] for r in runs)
    raw_median = statistics.median(raw)
    starts = [cold_start(spec.id, args.threads) for _ in range(2)]
    result = {
        "benchmark": "text",
        "model": spec.id,
        "threads": args.threads,
        "tokens": args.tokens,
        "prompt_tokens": prompt_len,
        "engine_decode_tok_s": round(engine, 1),
        "raw_llama_cpp_decode_tok_s": round(raw_median, 1),
        "decode_ratio_vs_raw": round(engine / raw_median, 3),
        "engine_decode_with_idle_embedder_tok_s": round(statistics.median(mixed), 1),
        "with_idle_embedder_ratio_vs_alone": round(statistics.median(mixed) / engine, 3),
        "cold_import_s": round(min(s["import_s"] for s in starts), 3),
        "cold_first_token_s": round(min(s["first_token_s"] for s in starts), 3),
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
