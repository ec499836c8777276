"""HTTP mechanics: routing, auth, rate limits, bounded bodies, JSON and chunked/SSE responses, errors.

The facade adds only transport: every route calls LocalEngine and serialises what it returns.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qsl, urlsplit

from polargrid import errors as sdk

from ..engine import LocalEngine
from ..errors import invalid
from .multipart import Part, parse_multipart
from .security import KeyCheck, RateLimiter

logger = logging.getLogger("polargrid_local.server")

DEFAULT_PORT = 55111
DEFAULT_MAX_BODY = 64 * 1024 * 1024
OPEN_PATHS = ("/health",)


@dataclass
class ServerConfig:
    """How the facade listens and whom it serves."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: list[str] = field(default_factory=list)
    rate_limit: int | None = None          # requests per minute per key (per client address without keys)
    max_body: int = DEFAULT_MAX_BODY


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


class Request:
    """What a route sees: method, path, query, headers and the (bounded) body."""

    def __init__(self, method: str, path: str, query: dict[str, str], headers, body: bytes) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body

    def json(self) -> dict[str, Any]:
        if not self.body:
            raise invalid("request body is empty; send a JSON object")
        try:
            data = json.loads(self.body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise invalid("request body must be a JSON object")
        return data

    def form(self) -> dict[str, Part]:
        content_type = self.headers.get("Content-Type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise invalid("this route takes multipart/form-data with a 'file' part")
        return parse_multipart(self.body, content_type)


def json_response(payload: Any, status: int = 200) -> Response:
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json")
    return Response(status, json.dumps(payload).encode())


_STATUS = ((sdk.ValidationError, 400, "invalid_request_error"), (sdk.AuthenticationError, 401, "authentication_error"),
           (sdk.BillingError, 402, "billing_error"), (sdk.NotFoundError, 404, "not_found_error"),
           (sdk.RateLimitError, 429, "rate_limit_error"), (sdk.TimeoutError, 504, "timeout_error"))


class _Status(sdk.PolarGridError):
    """An HTTP-level refusal (411, 413) with no SDK class of its own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status


def error_status(exc: sdk.PolarGridError) -> tuple[int, str]:
    if isinstance(exc, _Status):
        return exc.status_code, "invalid_request_error"
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
    code = type(exc).__name__
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
    """A threading HTTP server holding the engine, the routes and the security settings."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, engine: LocalEngine, config: ServerConfig, routes) -> None:
        self.engine, self.config, self.routes = engine, config, routes
        self.keys = KeyCheck(config.api_keys)
        self.limiter = RateLimiter(config.rate_limit)
        super().__init__((config.host, config.port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PolarGridHTTPServer
    server_version = "polargrid-local"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as separate writes; without this, Nagle and delayed ACKs add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # the default writes to stderr
        logger.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        url = urlsplit(self.path)
        status = 500
        self._body_read = False
        try:
            response = self._handle(method, url.path, dict(parse_qsl(url.query)))
        except sdk.PolarGridError as exc:
            response = error_response(exc)
        except Exception as exc:  # a bug in a route: still an answer the clients can read
            logger.exception("unhandled error on %s %s", method, url.path)
            response = error_response(sdk.ServerError(f"internal error: {type(exc).__name__}: {exc}", 500))
        if not self._body_read and self.headers.get("Content-Length", "0").strip() not in ("", "0"):
            # Refused before its body was read (auth, rate limit, no route): the unread body would be
            # parsed as the next request on this keep-alive connection, so the connection ends here.
            self.close_connection = True
        try:
            status = self._send(response, head=method == "HEAD")
        finally:
            logger.info("%s %s %d %.1fms", method, url.path, status, 1000 * (time.perf_counter() - started))

    def _handle(self, method: str, path: str, query: dict[str, str]) -> Response | StreamingResponse:
        route, params, allowed = self.server.routes.match(method, path)
        if route is None:
            if allowed:
                return Response(405, json.dumps(error_body(sdk.PolarGridError(
                    f"{method} is not allowed on {path}; use {', '.join(allowed)}"), 405, "invalid_request_error")
                ).encode(), headers={"Allow": ", ".join(allowed)})
            raise sdk.NotFoundError(f"No route {method} {path}")
        caller = self.client_address[0]
        if path not in OPEN_PATHS and self.server.keys.enabled:
            caller = self.server.keys.identify(self.headers.get("Authorization"))
            if caller is None:
                raise sdk.AuthenticationError("Invalid or missing API key: send 'Authorization: Bearer <key>'")
        if path not in OPEN_PATHS:
            retry = self.server.limiter.check(caller)
            if retry is not None:
                raise sdk.RateLimitError(f"Rate limit of {self.server.limiter.per_minute} requests per minute "
                                         f"exceeded; retry in {retry}s", retry_after=retry)
        body = self._read_body()
        request = Request(method, path, query, self.headers, body)
        return route(self.server.engine, request, **params)

    def _read_body(self) -> bytes:
        self._body_read = True
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            raise _Status(411, "chunked request bodies are not accepted; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise invalid("Content-Length is not a number") from None
        if length > self.server.config.max_body:
            self.close_connection = True  # the body stays unread
            raise _Status(413, f"request body of {length} bytes is over the {self.server.config.max_body} byte limit")
        return self.rfile.read(length) if length > 0 else b""

    def _send(self, response: Response | StreamingResponse, head: bool = False) -> int:
        if isinstance(response, StreamingResponse):
            return self._send_stream(response)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for key, value in response.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one segment for small answers, and a client still gets the
        # body when we close right after (a refused upload).
        self._headers_buffer.append(b"\r\n" + (b"" if head else response.body))
        self.flush_headers()
        return response.status

    def _send_stream(self, response: StreamingResponse) -> int:
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Accel-Buffering", "no")
            self.end_headers()
            for chunk in response.chunks:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.close_connection = True  # the client left: closing the response cancels its generation
        except Exception:
            # A byte stream (audio) that fails after the 200 has no error frame: the body ends without
            # its final chunk, which clients report as an incomplete response.
            logger.exception("%s %s failed while streaming", self.command, self.path)
            self.close_connection = True
        finally:
            response.close()
        return response.status


def make_server(engine: LocalEngine, config: ServerConfig | None = None) -> PolarGridHTTPServer:
    """A ready server (not yet serving): call ``serve_forever()``, or run it on a thread."""
    from .routes import ROUTES

    return PolarGridHTTPServer(engine, config or ServerConfig(), ROUTES)
