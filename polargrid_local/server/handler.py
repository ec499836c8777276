"""One connection's requests: strict framing, read deadlines, auth, dispatch, and the answer.

Every answer given before a request's body was read closes the connection, so an unread body can never
be taken for the next request. Refusals (bad framing, timeouts, HTTP/0.9) are JSON like every other error.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from polargrid import errors as sdk

from .app import PolarGridHTTPServer, Request, Response, StreamingResponse, error_body, error_response
from .framing import HttpRefusal, body_length, check_headers, check_request_line
from .security import address_group
from .watch import BODY, HEAD, IDLE, ClientGone

logger = logging.getLogger("polargrid_local.server")

MAX_REQUEST_LINE = 65536


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"   # so even a refusal of a bad request line has a status line
    server: PolarGridHTTPServer
    server_version = "polargrid-local"

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s  # type: ignore[misc]  # per connection, as it should
        super().setup()
        # Headers and body go out as separate writes; without this, Nagle and delayed ACKs add ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client = self.server.watch.open(self.connection)
        self._unread = 0

    def finish(self) -> None:
        self.server.watch.close(self.client)
        super().finish()

    def handle_one_request(self) -> None:
        watch, limits = self.server.watch, self.server.limits
        self.command, self.request_version, self._unread = "", self.default_request_version, 0
        try:
            # While draining, a request already on its way still gets its 503; an idle client is let go.
            watch.expect(self.client, IDLE, 0.5 if self.server.draining.is_set() else limits.keep_alive_timeout_s)
            self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
            watch.expect(self.client, HEAD, limits.header_timeout_s)
            if not self.raw_requestline or self.client.expired:
                self.close_connection = True
                return
            if len(self.raw_requestline) > MAX_REQUEST_LINE:
                self.requestline = ""
                self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.parse_request():
                return
            watch.expect(self.client, None)
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"method {self.command!r} is not supported")
                return
            method()
            self.wfile.flush()
        except TimeoutError as exc:
            self.log_error("request timed out: %r", exc)
            self.close_connection = True
        except (ConnectionError, OSError):
            self.close_connection = True

    def parse_request(self) -> bool:
        """The stdlib's parse, inside the strict rules of framing.py; False once a refusal is sent."""
        line = str(self.raw_requestline, "iso-8859-1")
        self.requestline = line.rstrip("\r\n")
        try:
            check_request_line(line)
        except HttpRefusal as exc:
            self.send_error(exc.status_code, exc.message)
            return False
        if not super().parse_request():
            return False
        if self.client.expired:
            self.send_error(HTTPStatus.REQUEST_TIMEOUT, f"request headers did not arrive within "
                            f"{self.server.limits.header_timeout_s:g}s")
            return False
        try:
            check_headers(self.headers)
            self._unread = body_length(self.headers, self.server.limits.max_body_bytes)
        except HttpRefusal as exc:
            self.send_error(exc.status_code, exc.message)
            return False
        return True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every refusal, the stdlib's own included, as the JSON error both clients read; then close."""
        status = int(code)
        try:
            default = HTTPStatus(status).phrase
        except ValueError:
            default = "error"
        self.close_connection = True
        self._send(error_response(HttpRefusal(status, message or default)), head=self.command == "HEAD")

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

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    def log_message(self, format: str, *args: Any) -> None:  # the default writes to stderr
        logger.debug("%s " + format, self.address_string(), *args)

    def _dispatch(self, method: str) -> None:
        started = time.perf_counter()
        url = urlsplit(self.path)
        status = 499
        self.server.request_started()
        try:
            try:
                response = self._handle(method, url.path, dict(parse_qsl(url.query)))
            except ClientGone:
                self.close_connection = True
                return
            except sdk.PolarGridError as exc:
                response = error_response(exc)
            except Exception as exc:  # a bug in a route: still an answer the clients can read
                logger.exception("unhandled error on %s %s", method, url.path)
                response = error_response(sdk.ServerError(f"internal error: {type(exc).__name__}: {exc}", 500))
            status = self._send(response, head=method == "HEAD")
        finally:
            self.server.request_ended()
            seconds = time.perf_counter() - started
            self.server.metrics.request(method, url.path, status, seconds)
            logger.info("%s %s %d %.1fms", method, url.path, status, 1000 * seconds)

    def _handle(self, method: str, path: str, query: dict[str, str]) -> Response | StreamingResponse:
        server = self.server
        if server.draining.is_set():
            raise HttpRefusal(503, "the server is shutting down; retry on another instance or later")
        route, params, allowed = server.routes.match(method, path)
        if route is None:
            if allowed:
                return Response(405, json.dumps(error_body(sdk.PolarGridError(
                    f"{method} is not allowed on {path}; use {', '.join(allowed)}"), 405, "invalid_request_error")
                ).encode(), headers={"Allow": ", ".join(allowed)})
            raise sdk.NotFoundError(f"No route {method} {path}")
        address = address_group(self.client_address[0])   # an IPv6 client counts by its /64
        caller = address
        if not server.is_open(path) and server.keys.enabled:
            refused = server.auth_failures.check(address)
            if refused is not None:
                retry, scope = refused
                raise sdk.RateLimitError(
                    f"Too many failed API key checks from {address}; retry in {retry}s" if scope == "address" else
                    f"Too many failed API key checks on this server in the last minute "
                    f"(auth_failures_global_per_minute); retry in {retry}s", retry_after=retry)
            identified = server.keys.identify(self.headers.get("Authorization"))
            if identified is None:
                server.auth_failures.failed(address)
                raise sdk.AuthenticationError("Invalid or missing API key: send 'Authorization: Bearer <key>'")
            caller = identified
        if not server.is_open(path):
            wait = server.limiter.check(caller)
            if wait is not None:
                raise sdk.RateLimitError(f"Rate limit of {server.limiter.per_minute} requests per minute "
                                         f"exceeded; retry in {wait}s", retry_after=wait)
        request = Request(method, path, query, self.headers, self._read_body(), self.client, server.limits, server)
        return route(server.engine, request, **params)

    def _read_body(self) -> bytes:
        length, self._unread = self._unread, 0
        if length <= 0:
            return b""
        self.server.watch.expect(self.client, BODY, self.server.limits.body_timeout_s)
        try:
            body = self.rfile.read(length)
        finally:
            self.server.watch.expect(self.client, None)
        if len(body) < length:
            self.close_connection = True
            if self.client.expired:
                raise HttpRefusal(408, f"the request body did not arrive within "
                                       f"{self.server.limits.body_timeout_s:g}s")
            raise ClientGone()
        return body

    def _send(self, response: Response | StreamingResponse, head: bool = False) -> int:
        if self._unread or self.server.draining.is_set():
            self.close_connection = True  # an answer before the body was read: the body must not be parsed
        if isinstance(response, StreamingResponse):
            return self._send_stream(response)
        body = response.body
        if response.content_type == "application/json":
            body = self.server.redact(body)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in response.headers.items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        # Headers and body in one write: one segment for small answers, and a client still gets the
        # body when we close right after (a refused upload).
        self._headers_buffer.append(b"\r\n" + (b"" if head else body))  # type: ignore[attr-defined]
        self.flush_headers()
        return response.status

    def _send_stream(self, response: StreamingResponse) -> int:
        events = response.content_type == "text/event-stream"
        try:
            self.send_response(response.status)
            self.send_header("Content-Type", response.content_type)
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("X-Accel-Buffering", "no")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            for chunk in response.chunks:
                if chunk:
                    if events:
                        chunk = self.server.redact(chunk)
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (TimeoutError, BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True  # the client left: closing the response cancels its generation
        except Exception:
            # A byte stream (audio) that fails after the 200 has no error frame: the body ends without
            # its final chunk, which clients report as an incomplete response.
            logger.exception("%s %s failed while streaming", self.command, self.path)
            self.close_connection = True
        finally:
            response.close()
        return response.status
