#!/usr/bin/env python3
"""HTTP facade benchmark: the same streamed chats in-process and over HTTP, and /health latency.

One engine serves both sides in this run. Prints one JSON object.

    python benchmarks/bench_http.py [--requests 8] [--tokens 64] [--concurrency 4]
"""
from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time

from polargrid_local import LocalEngine
from polargrid_local.server import running

MODEL = "smollm2-135m-instruct"


def request(i: int, tokens: int) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me story number {i} about a fox."}],
            "max_tokens": tokens, "temperature": 0.8, "seed": i}


def in_process(engine: LocalEngine, i: int, tokens: int) -> int:
    count = 0
    for chunk in engine.chat_completion_stream(request(i, tokens), stream_options={"include_usage": True}):
        if chunk.usage:
            count = chunk.usage.completion_tokens
    return count


def over_http(port: int, i: int, tokens: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    body = json.dumps({**request(i, tokens), "stream": True, "stream_options": {"include_usage": True}})
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    count = 0
    for line in response:
        if line.startswith(b"data: {") and b'"usage": {' in line:
            count = json.loads(line[6:])["usage"]["completion_tokens"]
    conn.close()
    return count


def throughput(fn, n: int, concurrency: int) -> float:
    counts: list[int] = []
    lock = threading.Lock()

    def worker(ids):
        for i in ids:
            c = fn(i)
            with lock:
                counts.append(c)

    groups = [list(range(k, n, concurrency)) for k in range(concurrency)]
    threads = [threading.Thread(target=worker, args=(g,)) for g in groups]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--health", type=int, default=300)
    args = parser.parse_args()

    engine = LocalEngine()
    with running(engine) as server:
        port = server.server_address[1]
        try:
            in_process(engine, 0, 8)
            over_http(port, 0, 8)
            result = {"benchmark": "http", "model": MODEL, "requests": args.requests, "tokens": args.tokens}
            for label, concurrency in (("sequential", 1), ("concurrent", args.concurrency)):
                local = throughput(lambda i: in_process(engine, i, args.tokens), args.requests, concurrency)
                remote = throughput(lambda i: over_http(port, i, args.tokens), args.requests, concurrency)
                result[label] = {"concurrency": concurrency, "in_process_tok_s": round(local, 1),
                                 "http_tok_s": round(remote, 1), "http_ratio": round(remote / local, 3)}
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            latencies = []
            for _ in range(args.health):
                started = time.perf_counter()
                conn.request("GET", "/health")
                conn.getresponse().read()
                latencies.append((time.perf_counter() - started) * 1000)
            conn.close()
            latencies.sort()
            result["health_ms"] = {"p50": round(statistics.median(latencies), 3),
                                   "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 3)}
            print(json.dumps(result))
        finally:
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
