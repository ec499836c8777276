"""A hostile OpenAI-compatible upstream on loopback, for the gateway's tests: each remote entry's base_url names
a behaviour (``http://127.0.0.1:PORT/<behaviour>/v1``), and the behaviour writes whatever bytes it likes,
as slowly as it likes: dripped headers, bodies past every bound, redirects, HTML pages, broken event streams.

Nothing here is a stand-in for one of our engines: it plays the remote server that a remote model's entry
points at, which is a peer we do not control. It records what it was asked and how much it managed to send.
"""
from __future__ import annotations

import http.server
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable

Behaviour = Callable[["Handler", str, bytes], None]   # (handler, route after /v1/, request body)

CHAT_CHUNK = {"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
              "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
COMPLETION_CHUNK = {"id": "up-2", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": "Hi", "finish_reason": None}]}


def event(payload: object) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


def chunk_for(route: str, text: str = "Hi", finish: str | None = None) -> dict:
    """One streamed chunk of the route's kind (chat or text completion)."""
    if route.startswith("chat"):
        return {**CHAT_CHUNK, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}
    return {**COMPLETION_CHUNK, "choices": [{"index": 0, "text": text, "finish_reason": finish}]}


def good_answer(route: str) -> tuple[str, bytes]:
    """(content type, body) of a well-formed answer to ``route``."""
    if route in ("chat/completions", "completions"):
        return "text/event-stream", event(chunk_for(route, "Hello", "stop")) + b"data: [DONE]\n\n"
    if route == "embeddings":
        return "application/json", json.dumps({"object": "list", "data": [
            {"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1.0]}],
            "usage": {"prompt_tokens": 2, "total_tokens": 2}}).encode()
    if route.startswith("audio/transcriptions") or route.startswith("audio/translations"):
        return "application/json", b'{"text": "hello"}'
    if route == "audio/speech":
        return "audio/wav", b"RIFF" + b"\0" * 40
    if route == "models":
        return "application/json", b'{"object": "list", "data": []}'
    return "application/json", b"{}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: UpstreamServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        self.close_connection = True
        parts = self.path.split("/", 3)   # "", behaviour, "v1", route
        name, route = (parts[1], parts[3]) if len(parts) == 4 else ("", "")
        up = self.server.upstream
        behaviour = up.behaviours.get(name)
        with up.lock:
            up.calls[(name, route)] += 1
            up.headers_seen.append((name, route, dict(self.headers)))
        body = b"" if getattr(behaviour, "unread_body", False) else self.read_body()
        if behaviour is None:
            self.answer(404, "application/json", b'{"error": {"message": "no such behaviour"}}')
            return
        try:
            behaviour(self, route, body)
        except OSError:
            pass   # the gateway hung up: often the point of the behaviour

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                data += self.rfile.read(size + 2)[:size]
                if size == 0:
                    return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # -- what a behaviour writes ---------------------------------------------------------------

    def raw(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.server.upstream.count_sent(self.path, len(data))

    def head(self, status: int, content_type: str | None, length: int | None = None,
             extra: Iterable[tuple[str, str]] = ()) -> bytes:
        lines = [f"HTTP/1.1 {status} Whatever"]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in extra] + ["Connection: close", "", ""]
        return "\r\n".join(lines).encode("latin-1")

    def answer(self, status: int, content_type: str | None, body: bytes,
               extra: Iterable[tuple[str, str]] = ()) -> None:
        self.raw(self.head(status, content_type, len(body), extra) + body)

    def drip(self, data: bytes, every: float = 1.0) -> None:
        """``data`` one byte at a time, ``every`` seconds apart (until the gateway hangs up)."""
        for i in range(len(data)):
            self.raw(data[i:i + 1])
            time.sleep(every)

    def flood(self, status: int, content_type: str, total: int, piece: bytes, prefix: bytes = b"",
              declare: bool = True) -> None:
        """``prefix`` then ``piece`` repeated up to ``total`` bytes, written as fast as the gateway reads."""
        self.raw(self.head(status, content_type, total if declare else None) + prefix)
        block = piece * max(1, (256 * 1024) // len(piece))
        sent = len(prefix)
        while sent < total:
            part = block[:total - sent]
            self.raw(part)
            sent += len(part)


class UpstreamServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    upstream: Upstream


class Upstream:
    """The stub remote. ``url(name)`` is a base_url for behaviour ``name``; ``sent(name)`` the bytes written for
    it; ``calls[(name, route)]`` how often it was asked."""

    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.bytes_sent: Counter[str] = Counter()
        self.headers_seen: list[tuple[str, str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.server = UpstreamServer(("127.0.0.1", 0), Handler)
        self.server.upstream = self
        threading.Thread(target=self.server.serve_forever, name="stub-upstream", daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}/v1"

    def on(self, name: str, behaviour: Behaviour, *, unread_body: bool = False) -> str:
        """Serve ``name`` with ``behaviour``; returns its base_url. ``unread_body``: never read the request."""
        if unread_body:
            behaviour.unread_body = True   # type: ignore[attr-defined]
        self.behaviours[name] = behaviour
        return self.url(name)

    def count_sent(self, path: str, n: int) -> None:
        with self.lock:
            self.bytes_sent[path.split("/", 2)[1]] += n

    def sent(self, name: str) -> int:
        with self.lock:
            return self.bytes_sent[name]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
