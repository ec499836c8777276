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

    python benchmarks/bench_remote.py [--streams 8] [--tokens 64] [--rounds 10] [--threads N]

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


def start_server(models: Path, port: int, threads: int | None, cpus: set[int] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "polargrid_local", "--models", str(models), "serve", "--port", str(port),
               "--log-level", "warning"]
    if threads:
        command += ["--threads", str(threads)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
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


def cpu_seconds(proc: subprocess.Popen) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--singles", type=int, default=20, help="one-stream TTFT samples per side")
    parser.add_argument("--threads", type=int, help="CPU threads of the remote's model")
    parser.add_argument("--split-cpus", action="store_true",
                        help="pin the remote to the first half of the CPUs and the gateway and clients to the rest, "
                             "as when the cluster is another machine (the remote's threads default to its half)")
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
        remote_cpus = gateway_cpus = None
        if args.split_cpus:
            cpus = sorted(os.sched_getaffinity(0))
            if len(cpus) < 2:
                raise SystemExit("--split-cpus needs at least 2 CPUs")
            remote_cpus, gateway_cpus = set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])
            args.threads = args.threads or len(remote_cpus)
            os.sched_setaffinity(0, gateway_cpus)   # the clients share the gateway's half
        remote = start_server(ROOT / "models.toml", remote_port, args.threads, remote_cpus)
        gateway = start_server(gateway_models, gateway_port, None, gateway_cpus)
        try:
            burst(remote_port, MODEL, args.streams, 8)  # load the model, warm both paths
            burst(gateway_port, "far-chat", args.streams, 8)
            direct, via, gateway_cpu = [], [], 0.0
            for round_ in range(args.rounds):
                if round_ % 2:   # alternate which side goes first, so neither always follows the other
                    direct.append(burst(remote_port, MODEL, args.streams, args.tokens))
                before = cpu_seconds(gateway)
                via.append(burst(gateway_port, "far-chat", args.streams, args.tokens))
                gateway_cpu += cpu_seconds(gateway) - before
                if not round_ % 2:
                    direct.append(burst(remote_port, MODEL, args.streams, args.tokens))
                print(f"round {round_ + 1}: direct {direct[-1]['tok_s']:.1f} tok/s, gateway {via[-1]['tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
            single_direct, single_via, single_cpu = [], [], 0.0
            for i in range(args.singles):
                # the burst's prompts, whose prefixes the remote has cached, and the order alternating: a
                # prompt sent first would pay the prefill that the second then finds in the cache
                prompt = i % args.streams
                if i % 2:
                    single_direct.append(stream(remote_port, MODEL, prompt, 2)[0])
                before = cpu_seconds(gateway)
                single_via.append(stream(gateway_port, "far-chat", prompt, 2)[0])
                single_cpu += cpu_seconds(gateway) - before
                if not i % 2:
                    single_direct.append(stream(remote_port, MODEL, prompt, 2)[0])
        finally:
            for proc in (gateway, remote):
                proc.terminate()
                proc.wait(30)
    ratios = [v["tok_s"] / d["tok_s"] for d, v in zip(direct, via)]
    ttft_direct = statistics.median(t for d in direct for t in d["ttft"])
    ttft_via = statistics.median(t for v in via for t in v["ttft"])
    # Per round: the remote's batch steps quantise time to first token (a request that misses a step waits
    # for the next, tens of ms), so one round's p50 difference swings by a step; the spread over rounds shows it.
    per_round = [1000 * (statistics.median(v["ttft"]) - statistics.median(d["ttft"])) for d, v in zip(direct, via)]
    print(json.dumps({
        "benchmark": "remote_gateway",
        "setup": f"{args.streams} concurrent streamed chats x {args.tokens} tokens, {args.rounds} alternating rounds; "
                 "remote = polargrid-local serve on 127.0.0.1, gateway = polargrid-local serve with a "
                 "[models.remote] entry for it",
        "cpus": os.cpu_count(),
        "cpu_split": {"remote": sorted(remote_cpus), "gateway_and_clients": sorted(gateway_cpus)} if remote_cpus else None,
        "remote_threads": args.threads,
        "direct_tok_s": [round(d["tok_s"], 1) for d in direct],
        "gateway_tok_s": [round(v["tok_s"], 1) for v in via],
        "same_chunks": [d["chunks"] == v["chunks"] for d, v in zip(direct, via)],
        "throughput_ratio": round(statistics.median(ratios), 3),
        "throughput_ratio_target": 0.95,
        "ttft_p50_direct_ms": round(1000 * ttft_direct, 1),
        "ttft_p50_gateway_ms": round(1000 * ttft_via, 1),
        "added_ttft_p50_ms": round(1000 * (ttft_via - ttft_direct), 1),
        "added_ttft_p50_ms_target": 5,
        "added_ttft_p50_ms_per_round": [round(x, 1) for x in per_round],
        "added_ttft_p50_ms_mean_of_rounds": round(statistics.fmean(per_round), 1),
        "added_ttft_p50_ms_mean_of_rounds_stderr": round(statistics.stdev(per_round) / len(per_round) ** 0.5, 1)
        if len(per_round) > 1 else None,
        "gateway_cpu_ms_per_token": round(1000 * gateway_cpu / max(1, sum(v["chunks"] for v in via)), 3),
        "gateway_cpu_ms_per_short_request": round(1000 * single_cpu / max(1, args.singles), 2),
        "ttft_single_p50_direct_ms": round(1000 * statistics.median(single_direct), 1),
        "ttft_single_p50_gateway_ms": round(1000 * statistics.median(single_via), 1),
        "added_ttft_single_p50_ms": round(1000 * (statistics.median(single_via) - statistics.median(single_direct)), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
