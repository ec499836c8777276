"""HTTP mechanics: routing, auth, rate limits, bounded bodies, JSON and chunked/SSE responses, errors.

The facade adds only transport: every route calls LocalEngine and serialises what it returns. What the
server promises a client (and its limits) is in limits.py and the README's "What the server promises".
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from typing import Any

from polargrid import errors as sdk

from ..engine import LocalEngine
from ..errors import check_text, invalid
from ..limits import DEFAULT_LIMITS, Limits
from .framing import HttpRefusal
from .multipart import Part, parse_multipart
from .security import AuthFailures, ConnectionsPerAddress, KeyCheck, RateLimiter, address_group
from .watch import Connection, ConnectionWatch

logger = logging.getLogger("polargrid_local.server")

DEFAULT_PORT = 55111
OPEN_PATHS = ("/health",)
OPEN_PREFIXES = ("/playground/",)   # the playground's static files (the page asks for the key itself)
CACHE_PLACEHOLDER = "<model cache>"


@dataclass
class ServerConfig:
    """How the facade listens and whom it serves; ``limits`` (default: the engine's) bounds what it accepts."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)
    rate_limit: int | None = None          # requests per minute per key (per client address without keys)
    limits: Limits | None = None
    malloc_arenas: int | None = 2          # cap glibc's malloc arenas in this process (None: leave them); malloc.py
    metrics_open: bool = False             # /metrics without an API key (for a scraper on a trusted network)


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamingResponse:
    """A body sent with chunked transfer encoding as ``chunks`` produces it; closing it cancels the work."""

    chunks: Iterator[bytes]
    content_type: str = "text/event-stream"
    status: int = 200

    def close(self) -> None:
        close = getattr(self.chunks, "close", None)
        if close is not None:
            close()


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:30]} is out of range")
    return value


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


class Request:
    """What a route sees: method, path, query, headers, the (bounded) body, and its client's connection."""

    def __init__(self, method: str, path: str, query: dict[str, str], headers, body: bytes,
                 client: Connection | None = None, limits: Limits = DEFAULT_LIMITS, server: Any = None) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.client = client or Connection(None)  # type: ignore[arg-type]  # no socket: nothing to watch
        self.limits = limits
        self.server = server

    def json(self) -> dict[str, Any]:
        """The body as a JSON object: strict UTF-8 and RFC 8259 (no NaN), every string valid Unicode, nesting
        bounded (``Limits.max_json_depth``); anything else is a 400 naming what is wrong."""
        if not self.body:
            raise invalid("request body is empty; send a JSON object")
        try:
            data = json.loads(self.body.decode("utf-8"), parse_float=_finite, parse_constant=_no_constants)
        except RecursionError:
            raise invalid(f"request body is nested more than {self.limits.max_json_depth} levels deep") from None
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to parse
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise invalid("request body must be a JSON object")
        check_text(data, max_depth=self.limits.max_json_depth)
        return data

    def form(self) -> dict[str, Part]:
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise invalid("this route takes multipart/form-data with a 'file' part")
        return parse_multipart(self.body, content_type)


def json_bytes(payload: Any) -> bytes:
    """``payload`` as strict JSON: a NaN or Infinity (which no JSON parser need accept) is a 500 that says so,
    never an answer the client cannot read."""
    try:
        return json.dumps(payload, allow_nan=False).encode()
    except ValueError as exc:
        raise sdk.ServerError(f"internal error: the answer could not be written as JSON ({exc})", 500) from None


def json_response(payload: Any, status: int = 200) -> Response:
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return Response(status, json_bytes(payload))


_STATUS = ((sdk.ValidationError, 400, "invalid_request_error"), (sdk.AuthenticationError, 401, "authentication_error"),
           (sdk.BillingError, 402, "billing_error"), (sdk.NotFoundError, 404, "not_found_error"),
           (sdk.RateLimitError, 429, "rate_limit_error"), (sdk.TimeoutError, 504, "timeout_error"))


def error_status(exc: sdk.PolarGridError) -> tuple[int, str]:
    if isinstance(exc, HttpRefusal):
        return exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error"
    if isinstance(exc, sdk.ServerError):
        return (exc.status_code if 500 <= exc.status_code < 600 else 500), "server_error"
    for cls, status, kind in _STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "server_error"


def error_body(exc: sdk.PolarGridError, status: int, kind: str) -> dict[str, Any]:
    """One body both clients read: OpenAI's ``error`` object and the SDK's top-level message/code."""
    details = getattr(exc, "details", None)
    param = (details or {}).get("field") if isinstance(details, dict) else None
    code = type(exc).__name__ if not isinstance(exc, HttpRefusal) else "InvalidRequestError"
    return {"error": {"message": exc.message, "type": kind, "code": code, "param": param},
            "message": exc.message, "code": code, "details": details, "status": status}


def error_response(exc: sdk.PolarGridError) -> Response:
    status, kind = error_status(exc)
    response = json_response(error_body(exc, status, kind), status)
    retry = getattr(exc, "retry_after", None)
    if retry:
        response.headers["Retry-After"] = str(retry)
    return response


Route = Callable[..., "Response | StreamingResponse"]


class PolarGridHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server holding the engine, the routes, the security settings and the limits."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, engine: LocalEngine, config: ServerConfig, routes) -> None:
        from .handler import Handler

        self.engine, self.config, self.routes = engine, config, routes
        self.limits: Limits = config.limits or getattr(engine, "limits", None) or DEFAULT_LIMITS
        self.keys = KeyCheck(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit)
        self.auth_failures = AuthFailures(self.limits.auth_failures_per_minute,
                                          self.limits.auth_failures_global_per_minute)
        self.per_address = ConnectionsPerAddress(self.limits.max_connections_per_address)
        cache_dir = getattr(getattr(engine, "registry", None), "cache_dir", None)
        # The cache path as it appears in a JSON body (escaped) and raw; never shown over HTTP.
        self._private = sorted({json.dumps(str(cache_dir))[1:-1].encode(), str(cache_dir).encode("utf-8",
                                "surrogateescape")}, key=len, reverse=True) if cache_dir else []
        self.draining = threading.Event()
        self._counts = threading.Lock()
        self.open_connections = 0
        self.in_flight = 0
        if ":" in config.host:   # an IPv6 address to listen on
            self.address_family = socket.AF_INET6
        self.open_paths = {*OPEN_PATHS, "/", *(("/metrics",) if config.metrics_open else ())}
        super().__init__((config.host, config.port), Handler)
        self.watch = ConnectionWatch()
        from .metrics import ServerMetrics

        self.metrics = ServerMetrics(self)

    def is_open(self, path: str) -> bool:
        """Paths served without an API key: /health, the playground page, and /metrics with metrics_open."""
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def redact(self, body: bytes) -> bytes:
        """Errors and status over HTTP never show where the models live on this host."""
        for path in self._private:
            if path in body:
                body = body.replace(path, CACHE_PLACEHOLDER.encode())
        return body

    # -- connections: a cap, counted here, and 503 past it ---------------------------------

    def process_request(self, request, client_address) -> None:
        group = address_group(client_address[0])
        with self._counts:
            room = self.open_connections < self.limits.max_connections and not self.draining.is_set()
            address_full = room and not self.per_address.admit(group)   # this address holds its share already
            admitted = room and not address_full
            if admitted:
                self.open_connections += 1
        if not admitted:
            self.refuse(request, "the server is shutting down" if self.draining.is_set() else
                        f"this address has {self.limits.max_connections_per_address} connections open, the limit "
                        "per address (max_connections_per_address); close one or retry shortly" if address_full else
                        f"the server is at its limit of {self.limits.max_connections} connections; retry shortly")
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._closed_one(client_address)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed_one(client_address)

    def _closed_one(self, client_address) -> None:
        with self._counts:
            self.open_connections -= 1
            self.per_address.release(address_group(client_address[0]))

    def refuse(self, sock: socket.socket, message: str) -> None:
        """503 on the accepting thread, without a handler thread, then a short lingering close."""
        body = json.dumps(error_body(sdk.ServerError(message, 503), 503, "server_error")).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
                "\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            sock.settimeout(1.0)
            sock.sendall(head + body)
        except OSError:
            sock.close()
            return
        self.watch.linger(sock)

    def request_started(self) -> None:
        with self._counts:
            self.in_flight += 1

    def request_ended(self) -> None:
        with self._counts:
            self.in_flight -= 1

    def server_close(self) -> None:
        super().server_close()
        self.watch.shutdown()
        self.metrics.close()


@contextlib.contextmanager
def running(engine: LocalEngine, config: ServerConfig | None = None, **settings: Any
            ) -> Iterator[PolarGridHTTPServer]:
    """The facade serving on a thread for the block's duration (tests, benchmarks, apps that embed it):
    ``with running(engine, port=0) as server: httpx.get(server.url + "/health")``. ``settings`` are
    ServerConfig fields (host and port default to 127.0.0.1 and a free port); the server is shut down and
    its socket closed on the way out. The engine stays open: it is the caller's."""
    if config is None:
        config = ServerConfig(**{"port": 0, **settings})
    elif settings:
        config = dataclasses.replace(config, **settings)
    server = make_server(engine, config)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name="polargrid-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def make_server(engine: LocalEngine, config: ServerConfig | None = None) -> PolarGridHTTPServer:
    """A ready server (not yet serving): call ``serve_forever()``, or run it on a thread; ``serve()`` runs one
    in the foreground with a graceful drain on SIGTERM."""
    from ..host.malloc import limit_arenas
    from . import extras, metrics, playground  # noqa: F401  (the routes beyond the SDK's register on ROUTES)
    from .routes import ROUTES

    config = config or ServerConfig()
    if config.malloc_arenas:
        limit_arenas(config.malloc_arenas)
    return PolarGridHTTPServer(engine, config, ROUTES)
