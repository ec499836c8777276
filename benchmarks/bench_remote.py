#!/usr/bin/env python3
"""Gateway overhead: 8 concurrent streamed chats sent to a remote directly, and the same through our gateway.

The remote is a `polargrid-local serve` process (an OpenAI-compatible server with continuous batching);
the gateway is a second `polargrid-local serve` process whose models.toml declares that remote. Both on
127.0.0.1. Rounds alternate direct and gateway, the same requests each time (temperature 0, so the same
tokens), and the figures are medians over rounds:

- throughput_ratio: gateway tokens/s over direct tokens/s (target >= 0.95);
- added_ttft_p50_ms: p50 time to first token through the gateway minus p50 direct, over the concurrent
  streams (target < 5 ms); on a loaded machine this also carries the remote's batching (a request that
  arrives a moment later can miss a decode step), so
- added_ttft_single_p50_ms: the same for one stream at a time, alternating direct and gateway, which
  isolates what the gateway itself adds.

    python benchmarks/bench_remote.py [--streams 8] [--tokens 64] [--rounds 3]

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(models: Path, port: int, threads: int | None) -> subprocess.Popen:
    command = [sys.executable, "-m", "polargrid_local", "--models", str(models), "serve", "--port", str(port),
               "--log-level", "warning"]
    if threads:
        command += ["--threads", str(threads)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server on port {port} did not start")


def stream(port: int, model: str, i: int, tokens: int) -> tuple[float, int, float]:
    """(seconds to the first content token, content chunks, seconds to the end) of one streamed chat."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Tell story number {i} about a fox."}],
                       "max_tokens": tokens, "temperature": 0, "stream": True})
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    first, count = None, 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            if choice.get("delta", {}).get("content"):
                count += 1
                first = first or time.perf_counter() - started
    conn.close()
    return first or 0.0, count, time.perf_counter() - started


def burst(port: int, model: str, n: int, tokens: int) -> dict:
    results: list[tuple[float, int, float]] = [None] * n  # type: ignore[list-item]

    def run(i: int) -> None:
        results[i] = stream(port, model, i, tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft": [r[0] for r in results],
            "chunks": sum(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--singles", type=int, default=10, help="one-stream TTFT samples per side")
    parser.add_argument("--threads", type=int, help="CPU threads of the remote's model")
    args = parser.parse_args()

    remote_port, gateway_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        gateway_models = Path(tmp) / "models.toml"
        gateway_models.write_text((ROOT / "models.toml").read_text() + f"""
[[models]]
id = "far-chat"
kind = "chat"
[models.remote]
base_url = "http://127.0.0.1:{remote_port}/v1"
model = "{MODEL}"
timeout = 300
""")
        remote = start_server(ROOT / "models.toml", remote_port, args.threads)
        gateway = start_server(gateway_models, gateway_port, None)
        try:
            burst(remote_port, MODEL, args.streams, 8)  # load the model, warm both paths
            burst(gateway_port, "far-chat", args.streams, 8)
            direct, via = [], []
            for round_ in range(args.rounds):
                direct.append(burst(remote_port, MODEL, args.streams, args.tokens))
                via.append(burst(gateway_port, "far-chat", args.streams, args.tokens))
                print(f"round {round_ + 1}: direct {direct[-1]['tok_s']:.1f} tok/s, gateway {via[-1]['tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
            single_direct, single_via = [], []
            for i in range(args.singles):
                single_direct.append(stream(remote_port, MODEL, i, 2)[0])
                single_via.append(stream(gateway_port, "far-chat", i, 2)[0])
        finally:
            for proc in (gateway, remote):
                proc.terminate()
                proc.wait(30)
    ratios = [v["tok_s"] / d["tok_s"] for d, v in zip(direct, via)]
    ttft_direct = statistics.median(t for d in direct for t in d["ttft"])
    ttft_via = statistics.median(t for v in via for t in v["ttft"])
    print(json.dumps({
        "benchmark": "remote_gateway",
        "setup": f"{args.streams} concurrent streamed chats x {args.tokens} tokens, {args.rounds} alternating rounds; "
                 "remote = polargrid-local serve on 127.0.0.1, gateway = polargrid-local serve with a "
                 "[models.remote] entry for it",
        "cpus": os.cpu_count(),
        "direct_tok_s": [round(d["tok_s"], 1) for d in direct],
        "gateway_tok_s": [round(v["tok_s"], 1) for v in via],
        "same_chunks": [d["chunks"] == v["chunks"] for d, v in zip(direct, via)],
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_target": 0.95,
        "ttft_p50_direct_ms": round(1000 * ttft_direct, 1),
        "ttft_p50_gateway_ms": round(1000 * ttft_via, 1),
        "added_ttft_p50_ms": round(1000 * (ttft_via - ttft_direct), 1),
        "added_ttft_p50_ms_target": 5,
        "ttft_single_p50_direct_ms": round(1000 * statistics.median(single_direct), 1),
        "ttft_single_p50_gateway_ms": round(1000 * statistics.median(single_via), 1),
        "added_ttft_single_p50_ms": round(1000 * (statistics.median(single_via) - statistics.median(single_direct)), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
