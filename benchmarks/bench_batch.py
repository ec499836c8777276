#!/usr/bin/env python3
"""Many users at once: continuous batching over HTTP vs raw llama.cpp batched decode and llama-cpp-python's server.

Measured in one run, same GGUF and threads: aggregate decode tokens/s of N concurrent streams through
`polargrid-local serve` and through `python -m llama_cpp.server`, raw llama.cpp decoding N sequences in
one batch, time-to-first-token p50 under that load, and second-turn vs first-turn time to first token
on a ~1,000-token conversation. Prints one JSON object.

    python benchmarks/bench_batch.py [--streams 8] [--tokens 64]
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
import threading
import time

from _raw import measure, prompt_tokens

from polargrid_local import LocalEngine, Registry
from polargrid_local.llm.backend import available_cpus
from polargrid_local.server import running

MODEL = "smollm2-135m-instruct"


def _stream(port: int, path: str, payload: dict) -> tuple[float, list[float]]:
    """Send one streamed request; returns (send time, arrival time of each content chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", path, body=json.dumps({**payload, "stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    arrivals = []
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        choice = (json.loads(line[6:]).get("choices") or [{}])[0]
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            arrivals.append(time.perf_counter())
    conn.close()
    return started, arrivals


def stream_chat(port: int, messages: list[dict], max_tokens: int, model: str) -> tuple[float, int, float]:
    """(seconds to first content, content chunks, total seconds) for one streamed chat over HTTP."""
    started, arrivals = _stream(port, "/v1/chat/completions", {"model": model, "messages": messages,
                                                               "max_tokens": max_tokens, "temperature": 0})
    end = arrivals[-1] if arrivals else time.perf_counter()
    return (arrivals[0] - started if arrivals else 0.0), len(arrivals), end - started


SINGLE_PROMPT = "1, 2, 3, 4, 5, 6,"


def counting_prompt(i: int) -> str:
    """A prompt that counts upwards from i, so no stream stops early."""
    return ", ".join(str(k) for k in range(i, i + 12))


def concurrent_streams(port: int, n: int, max_tokens: int, model: str, salt: int = 0) -> dict:
    """n completions that count upwards (so none stops early) streamed at once over HTTP."""
    results: list[tuple[float, list[float]]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        out = _stream(port, "/v1/completions", {"model": model, "prompt": counting_prompt(i),
                                                "max_tokens": max_tokens, "temperature": 0})
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i * 100 + salt * 1000,)) for i in range(n)]  # fresh prompts
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    firsts = [a[0] - s for s, a in results if a]
    # steady state: from the moment every stream is generating until the first one ends
    t0, t1 = max(a[0] for _s, a in results), min(a[-1] for _s, a in results)
    in_window = sum(sum(1 for x in a if t0 < x <= t1) for _s, a in results)
    wall = max(a[-1] for _s, a in results) - min(s for s, _a in results)
    return {"tok_s": round(in_window / (t1 - t0), 1) if t1 > t0 else None,
            "overall_tok_s": round(sum(len(a) for _s, a in results) / wall, 1),
            "ttft_p50_s": round(statistics.median(firsts), 3), "ttft_max_s": round(max(firsts), 3),
            "tokens": sum(len(a) for _s, a in results), "complete_streams": sum(len(a) >= max_tokens for _s, a in results)}


def concurrent_chat_ttft(port: int, n: int, model: str) -> dict:
    """n chats with short questions at once (the template's system prompt is shared): time to first token."""
    firsts: list[float] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        ttft, _n, _total = stream_chat(port, [{"role": "user", "content": f"What is {i} plus {i}?"}], 16, model)
        with lock:
            firsts.append(ttft)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"ttft_p50_s": round(statistics.median(firsts), 3), "ttft_max_s": round(max(firsts), 3)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_cpp_server(path: str, threads: int, n: int, max_tokens: int) -> dict:
    port = free_port()
    # interrupt_requests off: by default a new request cuts the running one short, which would handicap it here
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", path, "--n_threads", str(threads),
                             "--n_threads_batch", str(threads), "--n_ctx", "4096", "--port", str(port),
                             "--host", "127.0.0.1", "--model_alias", MODEL, "--interrupt_requests", "false"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            return {"error": "llama_cpp.server did not start"}
        stream_chat(port, [{"role": "user", "content": "Hi"}], 4, MODEL)
        out = concurrent_streams(port, n, max_tokens, MODEL, salt=1)  # the engine's first run's prompts
        out["chat_ttft"] = concurrent_chat_ttft(port, n, MODEL)
        return out
    finally:
        proc.terminate()
        proc.wait(10)


def second_turn(port: int) -> dict:
    history = [{"role": "system", "content": "You are a helpful assistant for a hiking club. " +
                " ".join(f"Rule {i}: members keep the trail clean and help each other on the way." for i in range(60))}]
    history.append({"role": "user", "content": "Suggest a short walk for a rainy day."})
    first_ttft, _, _ = stream_chat(port, history, 24, MODEL)
    history += [{"role": "assistant", "content": "Try the river loop: flat, sheltered by trees, about an hour."},
                {"role": "user", "content": "And one for a sunny afternoon?"}]
    conn_probe = stream_chat(port, history, 24, MODEL)
    return {"first_turn_ttft_s": round(first_ttft, 3), "second_turn_ttft_s": round(conn_probe[0], 3),
            "second_vs_first": round(conn_probe[0] / first_ttft, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=available_cpus())
    parser.add_argument("--skip-llama-cpp-server", action="store_true")
    args = parser.parse_args()

    registry = Registry.load()
    spec = registry.get(MODEL)
    path = str(spec.path_in(registry.cache_dir))
    result = {"benchmark": "batch", "model": MODEL, "threads": args.threads, "streams": args.streams,
              "tokens_per_stream": args.tokens}


    engine = LocalEngine(n_threads=args.threads, n_gpu_layers=0, n_parallel=args.streams)
    with running(engine) as server:
        port = server.server_address[1]
        try:
            stream_chat(port, [{"role": "user", "content": "Hi"}], 4, MODEL)
            # like for like: the raw baselines get prompts of the engine's length in tokens, the same threads,
            # the same number of runs and the same statistic (median)
            single_len = prompt_tokens(path, [SINGLE_PROMPT])
            batched_len = prompt_tokens(path, [counting_prompt(i * 100 + 1000) for i in range(args.streams)])
            result["prompt_tokens"] = {"single": single_len, "batched": batched_len}
            ours, raw_single = [], []
            for _ in range(3):  # alternated with the raw baseline, so the machine's drift hits both
                _started, arrivals = _stream(port, "/v1/completions", {"model": MODEL, "prompt": SINGLE_PROMPT,
                                                                       "max_tokens": 128, "temperature": 0})
                ours.append((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]))
                raw_single += measure(path, args.threads, "single", prompt_len=single_len, tokens=128)
            result["raw_single_tok_s"] = round(statistics.median(raw_single), 1)
            result["engine_single_stream_http_tok_s"] = round(statistics.median(ours), 1)
            result["single_ratio_vs_raw"] = round(result["engine_single_stream_http_tok_s"] / result["raw_single_tok_s"], 3)
            runs, raw_batched = [], []
            for round_ in range(2):  # alternated with the raw baseline
                raw_batched += measure(path, args.threads, "batched", n_seq=args.streams, prompt_len=batched_len,
                                       tokens=args.tokens)
                runs.append(concurrent_streams(port, args.streams, args.tokens, MODEL, salt=round_ + 1))
            result["raw_batched_tok_s"] = round(statistics.median(raw_batched), 1)
            first_run = dict(runs[0])  # what the llama-cpp-python server is compared with: the same prompts
            result["engine_http"] = runs[0]  # its time-to-first-token figures; tok_s is the median of both runs
            result["engine_http"]["tok_s"] = round(statistics.median(r["tok_s"] or 0 for r in runs), 1)
            result["batched_ratio_vs_raw"] = round(result["engine_http"]["tok_s"] / result["raw_batched_tok_s"], 3)
            result["engine_http_chat_ttft"] = concurrent_chat_ttft(port, args.streams, MODEL)
            result["prefix_reuse"] = second_turn(port)
        finally:
            engine.close()
    if not args.skip_llama_cpp_server:
        try:
            result["llama_cpp_python_server"] = llama_cpp_server(path, args.threads, args.streams, args.tokens)
            other = result["llama_cpp_python_server"]
            for key in ("tok_s", "overall_tok_s"):  # same prompts, tokens and threads as the engine's first run
                if other.get(key) and first_run.get(key):
                    result[f"engine_vs_llama_cpp_python_server_{key}"] = round(first_run[key] / other[key], 2)
        except Exception as exc:  # the comparison is optional; its absence is reported, not hidden
            result["llama_cpp_python_server"] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
