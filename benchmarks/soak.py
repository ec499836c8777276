#!/usr/bin/env python3
"""Soak: N clients for M minutes of mixed traffic against the HTTP facade on loopback.

The server runs in a child process (so its RSS and thread count are its own), on a free port of
127.0.0.1. Clients mix plain and streamed chat (a share of the streams is cancelled by closing the
socket mid-stream), completions, embeddings, speech, transcription, and model load/unload cycles
(which cut other clients' requests short: those must end with a typed 503, never silently).

Remote models are in the mix too (``--no-remote`` leaves them out): ``far-chat`` and ``far-embed`` forward
to the server's own facade (a gateway in front of a cluster, on one box), and ``far-broken``,
``far-broken-embed`` and ``far-broken-fallback`` (which falls back to the local chat model) forward to a
misbehaving remote that this process runs: each answer is one of good, 503, a redirect, an HTML page,
dripped headers or body, a stall mid-stream, floods past the bounds, an empty or malformed stream, a 500
with a big body. Those requests must end with an answer or a typed error (502/503/504), never lost.

Every minute it prints one JSON line: requests ok and failed by class, p50/p99 latency per route (of
answers, and of typed errors as "<route> error"),
the server's RSS and thread count. At the end it prints (and with --out writes) one JSON object:
lost requests (no response and no typed error), RSS growth after warm-up, max thread count.

    python benchmarks/soak.py --clients 16 --minutes 30 [--out benchmarks/results/soak-DATE.json]
    python benchmarks/soak.py --quick     # 8 clients for 3 minutes: checks that it runs
"""
from __future__ import annotations

import argparse
import collections
import http.client
import http.server
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import wave

HOST = "127.0.0.1"   # loopback only
CHAT, EMBED, STT, TTS = "smollm2-135m-instruct", "smollm2-135m-embed", "whisper-tiny.en", "piper-en_US-joe-medium"
CLIENT_TIMEOUT = 900  # a socket read longer than this counts as lost (the server's own limit is shorter)

# route -> weight; admin cycles are rare on purpose
MIX = [("chat", 22), ("chat_stream", 22), ("completion", 14), ("embeddings", 14), ("speech", 10),
       ("transcription", 10), ("admin", 2)]
REMOTE_MIX = [("remote_chat", 6), ("remote_stream", 6), ("remote_embeddings", 4), ("broken_remote", 6),
              ("broken_stream", 4), ("broken_embeddings", 3), ("broken_fallback", 3)]
FLOOD = 16 * 1024 * 1024   # bytes a flooding remote offers; its bounds (below) stop reading far earlier


# -- the server, in a child process -------------------------------------------------------------

def remote_entries(port: int, broken_url: str) -> str:
    """models.toml entries for the remote models: two that forward to this very server, three to the broken one."""
    own = f"http://{HOST}:{port}/v1"
    bounds = "max_response_bytes = 1048576\nmax_sse_line_bytes = 65536\nmax_sse_event_bytes = 262144\n"
    return (f'[[models]]\nid = "far-chat"\nkind = "chat"\n[models.remote]\nbase_url = "{own}"\nmodel = "{CHAT}"\n'
            f"timeout = 600\n\n"
            f'[[models]]\nid = "far-embed"\nkind = "embedding"\n[models.remote]\nbase_url = "{own}"\n'
            f'model = "{EMBED}"\ntimeout = 600\n\n'
            f'[[models]]\nid = "far-broken"\nkind = "chat"\n[models.remote]\nbase_url = "{broken_url}"\n'
            f'model = "m"\ntimeout = 2\nmax_retries = 1\n{bounds}\n'
            f'[[models]]\nid = "far-broken-embed"\nkind = "embedding"\n[models.remote]\nbase_url = "{broken_url}"\n'
            f'model = "m"\ntimeout = 2\nmax_retries = 1\n{bounds}\n'
            f'[[models]]\nid = "far-broken-fallback"\nkind = "chat"\nfallback = ["{CHAT}"]\n[models.remote]\n'
            f'base_url = "{broken_url}"\nmodel = "m"\ntimeout = 2\nmax_retries = 1\n{bounds}\n')


def serve(port: int, broken_url: str | None) -> None:
    from polargrid_local import LocalEngine
    from polargrid_local.server import running

    models = None
    if broken_url:
        models = os.path.join(tempfile.mkdtemp(prefix="soak-"), "models.toml")
        with open(models, "w") as f:
            f.write(remote_entries(port, broken_url))
    engine = LocalEngine(models)
    with running(engine, host=HOST, port=port) as server:
        print(server.server_address[1], flush=True)
        sys.stdin.read()   # until the parent is gone
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- the misbehaving remote, in this process ----------------------------------------------------------

BROKEN = ["good", "good", "good", "503", "redirect", "html", "drip_head", "drip_body", "stall", "flood_json",
          "flood_line", "flood_events", "no_events", "malformed", "error_500"]


class BrokenRemote(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server that answers each request with one of BROKEN, at random."""

    protocol_version = "HTTP/1.1"
    seen: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._send(200, "application/json", b'{"object": "list", "data": []}')

    def do_POST(self) -> None:
        self.close_connection = True
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        how = random.choice(BROKEN)
        with self.lock:
            self.seen[how] += 1
        streamed = self.path.endswith("/chat/completions")
        try:
            getattr(self, "_" + how)(streamed)
        except OSError:
            pass   # the gateway hung up, as it should past a bound or a deadline

    def _head(self, status: int, content_type: str, length: int | None = None, extra: str = "") -> bytes:
        size = f"Content-Length: {length}\r\n" if length is not None else ""
        return (f"HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\n{size}{extra}Connection: close\r\n\r\n"
                ).encode()

    def _send(self, status: int, content_type: str, body: bytes, extra: str = "") -> None:
        self.wfile.write(self._head(status, content_type, len(body), extra) + body)

    def _answer(self, streamed: bool) -> tuple[str, bytes]:
        if streamed:
            chunk = {"id": "b", "object": "chat.completion.chunk", "created": 1, "model": "m",
                     "choices": [{"index": 0, "delta": {"content": "Hello."}, "finish_reason": "stop"}]}
            return "text/event-stream", b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
        return "application/json", json.dumps({"data": [{"index": 0, "embedding": [0.1, 0.2, 0.3]}],
                                               "usage": {"prompt_tokens": 1, "total_tokens": 1}}).encode()

    def _good(self, streamed: bool) -> None:
        self._send(200, *self._answer(streamed))

    def _503(self, streamed: bool) -> None:
        self._send(503, "application/json", b'{"error": {"message": "overloaded"}}', "Retry-After: 0\r\n")

    def _redirect(self, streamed: bool) -> None:
        self._send(302, "text/html", b"moved", "Location: http://127.0.0.1:9/\r\n")

    def _html(self, streamed: bool) -> None:
        self._send(200, "text/html", b"<html>captive portal</html>")

    def _drip_head(self, streamed: bool) -> None:
        content_type, body = self._answer(streamed)
        for byte in self._head(200, content_type, len(body))[:8]:   # 8 bytes in 8 s, then it hangs up
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(1)

    def _drip_body(self, streamed: bool) -> None:
        content_type, body = self._answer(streamed)
        self.wfile.write(self._head(200, content_type, len(body)))
        for byte in body[:8]:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(1)

    def _stall(self, streamed: bool) -> None:
        content_type, body = self._answer(streamed)
        self.wfile.write(self._head(200, content_type, len(body)) + body[:len(body) // 2])
        self.wfile.flush()
        time.sleep(5)   # past the remote's 2 s timeout

    def _flood(self, content_type: str, prefix: bytes, piece: bytes, status: int = 200) -> None:
        self.wfile.write(self._head(status, content_type) + prefix)
        block, sent = piece * (65536 // len(piece)), 0
        while sent < FLOOD:
            self.wfile.write(block)
            sent += len(block)

    def _flood_json(self, streamed: bool) -> None:
        self._flood("application/json", b'{"data": [', b"0,")

    def _flood_line(self, streamed: bool) -> None:
        self._flood("text/event-stream", b"data: ", b"x")

    def _flood_events(self, streamed: bool) -> None:
        self._flood("text/event-stream", b"", b"data: {}\n")

    def _no_events(self, streamed: bool) -> None:
        self._send(200, "text/event-stream", b"data: [DONE]\n\n")

    def _malformed(self, streamed: bool) -> None:
        self._send(200, "text/event-stream" if streamed else "application/json", b"data: {not json\n\n")

    def _error_500(self, streamed: bool) -> None:
        self._flood("application/json", b'{"error": {"message": "', b"e", status=500)


def broken_remote() -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer((HOST, 0), BrokenRemote)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, name="broken-remote", daemon=True).start()
    return server, f"http://{HOST}:{server.server_address[1]}/v1"


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS bytes, thread count) of a process, from /proc."""
    rss = threads = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss, threads


# -- one request of each kind ---------------------------------------------------------------------

class Lost(Exception):
    """No response and no typed error: the thing the soak must never see."""


def _typed_error(status: int, body: bytes) -> str:
    try:
        error = json.loads(body)["error"]
        return f"{status}:{error.get('type') or error.get('code')}"
    except Exception:
        raise Lost(f"HTTP {status} without a typed error body: {body[:200]!r}") from None


def _post(port: int, path: str, body: bytes, content_type: str = "application/json"):
    conn = http.client.HTTPConnection(HOST, port, timeout=CLIENT_TIMEOUT)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": content_type})
        return conn, conn.getresponse()
    except Exception as exc:
        conn.close()
        raise Lost(f"{path}: {type(exc).__name__}: {exc}") from None


def _json_call(port: int, path: str, payload: dict) -> str:
    conn, response = _post(port, path, json.dumps(payload).encode())
    try:
        data = response.read()
    except Exception as exc:
        raise Lost(f"{path}: body not read: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    if response.status == 200:
        return "ok"
    return _typed_error(response.status, data)


def _stream_call(port: int, path: str, payload: dict, cancel_after: int | None) -> str:
    conn, response = _post(port, path, json.dumps(payload).encode())
    try:
        if response.status != 200:
            return _typed_error(response.status, response.read())
        frames = 0
        while True:
            line = response.readline()
            if not line:
                raise Lost(f"{path}: stream ended without [DONE] or an error frame after {frames} frames")
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                return "ok"
            event = json.loads(data)
            if "error" in event:
                error = event["error"]
                return f"stream-error:{error.get('type') or error.get('code')}"
            frames += 1
            if cancel_after is not None and frames >= cancel_after:
                return "cancelled"   # closing the socket below is the cancel
    except Lost:
        raise
    except Exception as exc:
        raise Lost(f"{path}: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()


def _multipart(fields: dict[str, str], wav: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
              f'Content-Type: audio/wav\r\n\r\n'.encode() + wav + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


PROMPTS = ["Write one sentence about cats.", "Name three colours.", "What is the capital of France?",
           "Tell me a short story about a fox.", "Explain rain in one sentence."]


def one_request(kind: str, port: int, rng: random.Random, wav: bytes) -> str:
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    if kind == "chat":
        return _json_call(port, "/v1/chat/completions", {"model": CHAT, "messages": messages,
                                                         "max_tokens": rng.randint(8, 48)})
    if kind == "chat_stream":
        cancel = rng.randint(1, 6) if rng.random() < 0.3 else None
        return _stream_call(port, "/v1/chat/completions", {"model": CHAT, "messages": messages, "stream": True,
                                                           "max_tokens": rng.randint(16, 64)}, cancel)
    if kind == "completion":
        prompts = [f"{i}, {i + 1}, {i + 2}," for i in range(rng.randint(1, 3))]
        return _json_call(port, "/v1/completions", {"model": CHAT, "prompt": prompts if len(prompts) > 1 else
                                                    prompts[0], "max_tokens": rng.randint(8, 32)})
    if kind == "embeddings":
        return _json_call(port, "/v1/embeddings", {"model": EMBED, "input": [rng.choice(PROMPTS) for _ in
                                                                             range(rng.randint(1, 8))]})
    if kind == "speech":
        conn, response = _post(port, "/v1/audio/speech", json.dumps({
            "model": TTS, "input": rng.choice(PROMPTS), "voice": "alloy", "response_format": "wav"}).encode())
        try:
            data = response.read()
        except Exception as exc:
            raise Lost(f"speech: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        if response.status != 200:
            return _typed_error(response.status, data)
        if not data.startswith(b"RIFF"):
            raise Lost("speech: 200 without audio")
        return "ok"
    if kind == "transcription":
        body, content_type = _multipart({"model": STT}, wav)
        conn, response = _post(port, "/v1/audio/transcriptions", body, content_type)
        try:
            data = response.read()
        except Exception as exc:
            raise Lost(f"transcription: {type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        return "ok" if response.status == 200 else _typed_error(response.status, data)
    if kind in ("remote_chat", "broken_remote", "broken_fallback"):
        model = {"remote_chat": "far-chat", "broken_remote": "far-broken", "broken_fallback": "far-broken-fallback"}
        return _json_call(port, "/v1/chat/completions", {"model": model[kind], "messages": messages,
                                                         "max_tokens": rng.randint(8, 48)})
    if kind in ("remote_stream", "broken_stream"):
        cancel = rng.randint(1, 6) if rng.random() < 0.3 else None
        model = "far-chat" if kind == "remote_stream" else "far-broken"
        return _stream_call(port, "/v1/chat/completions", {"model": model, "messages": messages, "stream": True,
                                                           "max_tokens": rng.randint(16, 64)}, cancel)
    if kind in ("remote_embeddings", "broken_embeddings"):
        model = "far-embed" if kind == "remote_embeddings" else "far-broken-embed"
        return _json_call(port, "/v1/embeddings", {"model": model, "input": [rng.choice(PROMPTS) for _ in
                                                                             range(rng.randint(1, 8))]})
    # admin: unload a model, force-reload one, or purge everything
    choice = rng.random()
    if choice < 0.5:
        return _json_call(port, "/v1/models/unload", {"model_name": rng.choice([CHAT, EMBED, STT, TTS])})
    if choice < 0.85:
        return _json_call(port, "/v1/models/load", {"model_name": rng.choice([CHAT, EMBED]), "force_reload": True})
    return _json_call(port, "/v1/gpu/purge", {"force": True})


def short_wav(port: int) -> bytes:
    conn, response = _post(port, "/v1/audio/speech", json.dumps({
        "model": TTS, "input": "The quick brown fox jumps over the lazy dog.", "voice": "alloy",
        "response_format": "wav"}).encode())
    data = response.read()
    conn.close()
    with wave.open(io.BytesIO(data)):
        pass
    return data


# -- the run ---------------------------------------------------------------------------------------

class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.window: collections.Counter[str] = collections.Counter()
        self.total: collections.Counter[str] = collections.Counter()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.lost: list[str] = []

    def add(self, kind: str, outcome: str, seconds: float, detail: str | None = None) -> None:
        key = f"{kind} {outcome}"
        with self.lock:
            self.window[key] += 1
            self.total[key] += 1
            if outcome in ("ok", "cancelled"):
                self.latency[kind].append(seconds)
            elif outcome != "LOST":   # how long a typed error took to arrive (a broken remote's, mostly)
                self.latency[f"{kind} error"].append(seconds)
            if detail is not None and len(self.lost) < 50:
                self.lost.append(detail)

    def flush(self) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
        with self.lock:
            window, self.window = dict(self.window), collections.Counter()
            latency, self.latency = self.latency, collections.defaultdict(list)
        return window, {k: _percentiles(v) for k, v in latency.items()}


def _percentiles(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    if not values:
        return {}
    p99 = values[min(len(values) - 1, int(round(0.99 * (len(values) - 1))))]
    return {"n": len(values), "p50_ms": round(1000 * statistics.median(values)), "p99_ms": round(1000 * p99)}


def client(port: int, seed: int, end: float, tally: Tally, wav: bytes, mix: list[tuple[str, int]]) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*mix, strict=True)
    while time.monotonic() < end:   # bounded: stops at the end time
        kind = rng.choices(kinds, weights)[0]
        started = time.monotonic()
        try:
            outcome, detail = one_request(kind, port, rng, wav), None
        except Lost as exc:
            outcome, detail = "LOST", str(exc)
        tally.add(kind, outcome, time.monotonic() - started, detail)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--report-every", type=float, default=60.0, help="seconds between progress lines")
    parser.add_argument("--warmup", type=float, default=None, help="minutes before the RSS baseline "
                        "(default: a fifth of the run)")
    parser.add_argument("--out", help="write the final JSON here too")
    parser.add_argument("--no-remote", action="store_true", help="leave the remote models out of the mix")
    parser.add_argument("--quick", action="store_true", help="8 clients for 3 minutes (overrides both)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)      # the child: serve on this port
    parser.add_argument("--broken", help=argparse.SUPPRESS)              # the child: the broken remote's URL
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve, args.broken)
        return 0
    if args.quick:
        args.clients, args.minutes, args.report_every = 8, 3.0, min(args.report_every, 60.0)

    mix = MIX if args.no_remote else MIX + REMOTE_MIX
    command = [sys.executable, os.path.abspath(__file__), "--serve", str(free_port())]
    broken = None
    if not args.no_remote:
        broken, broken_url = broken_remote()
        command += ["--broken", broken_url]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        wav = short_wav(port)
        tally = Tally()
        started = time.monotonic()
        end = started + 60 * args.minutes
        warmup_s = 60 * (args.warmup if args.warmup is not None else args.minutes / 5)
        threads = [threading.Thread(target=client, args=(port, i, end, tally, wav, mix), daemon=True)
                   for i in range(args.clients)]
        for t in threads:
            t.start()
        samples: list[tuple[float, int, int]] = []
        reports = []
        next_report = started + args.report_every
        while any(t.is_alive() for t in threads):
            time.sleep(5)
            now = time.monotonic()
            rss, nthreads = proc_status(child.pid)
            samples.append((now - started, rss, nthreads))
            if now >= next_report or not any(t.is_alive() for t in threads):
                next_report += args.report_every
                window, latency = tally.flush()
                line = {"t_min": round((now - started) / 60, 2), "requests": window, "latency": latency,
                        "rss_mb": round(rss / 2**20, 1), "threads": nthreads}
                reports.append(line)
                print(json.dumps(line), flush=True)
            if now > end + CLIENT_TIMEOUT + 60:
                print("clients still running past the end; giving up on them", file=sys.stderr)
                break
        stuck = sum(t.is_alive() for t in threads)
        after = [s for s in samples if s[0] >= warmup_s]
        baseline_window = [s[1] for s in after if s[0] < warmup_s + 60 * max(1.0, args.minutes / 10)]
        final_window = [s[1] for s in samples if s[0] >= samples[-1][0] - 60 * max(1.0, args.minutes / 10)]
        baseline = statistics.median(baseline_window) if baseline_window else samples[0][1]
        final = statistics.median(final_window)
        totals = dict(tally.total)
        by_class = collections.Counter()
        for key, n in totals.items():
            by_class[key.split(" ", 1)[1]] += n
        result = {
            "clients": args.clients, "minutes": args.minutes,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "requests": sum(totals.values()), "by_class": dict(by_class), "by_route_and_class": totals,
            "lost_requests": by_class.get("LOST", 0) + stuck, "lost_examples": tally.lost[:20],
            "clients_stuck_at_end": stuck,
            "rss_mb_at_warmup": round(baseline / 2**20, 1), "rss_mb_final": round(final / 2**20, 1),
            "rss_growth_after_warmup_pct": round(100 * (final - baseline) / baseline, 2),
            "rss_mb_max": round(max(s[1] for s in samples) / 2**20, 1),
            "max_threads": max(s[2] for s in samples), "threads_final": samples[-1][2],
            "warmup_minutes": round(warmup_s / 60, 2), "remote_models": not args.no_remote,
            "broken_remote_answers": dict(BrokenRemote.seen), "reports": reports,
            "note": "server and clients share one loaded 2-core machine with other jobs: latencies are pessimistic",
        }
        print(json.dumps({k: v for k, v in result.items() if k != "reports"}, indent=2), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return 0 if result["lost_requests"] == 0 else 1
    finally:
        child.stdin.close()
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            child.kill()
        if broken is not None:
            broken.shutdown()
            broken.server_close()


if __name__ == "__main__":
    sys.exit(main())
