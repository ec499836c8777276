"""RemoteBackend: one remote model's HTTP client: retries within the request's deadline, errors mapped (keys
scrubbed), only a 2xx of the expected content type taken as an answer, answers read within the model's
bounds, the offline guard.

This is the only code in polargrid_local that opens connections outside loopback at run time,
and only for models that models.toml declares remote.
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
from polargrid import errors as sdk

from ..host import offline as offline_guard
from ..runtime.pulled import run_at
from ..store.registry import ModelSpec
from .deadline import DeadlineTransport, within
from .errors import ERROR_BODY_BYTES, error_for_status, error_in_stream, retry_after_seconds, scrub
from .forward import Forward
from .sse import BoundExceeded, SSEFormatError, counted, lines, sse_payloads
from .worker import RemoteWorker

Deadline = tuple[float, Callable[[], BaseException]]   # when a request must end (time.monotonic()), and its error

logger = logging.getLogger("polargrid_local")

FIRST_BACKOFF = 0.25   # seconds before the first retry; doubles each time
BYTES_CHUNK = 16 * 1024  # bytes read at a time from a streamed binary answer (speech)
PROBE_TIMEOUT = 2.0    # seconds a health probe may take in all


def is_loopback(host: str | None) -> bool:
    """True for localhost and 127.0.0.0/8 or ::1 literals (no DNS lookup: that would be traffic too)."""
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class RemoteBackend:
    """What a remote model's worker holds: an httpx client bound to the model's ``[models.remote]``."""

    worker_type = RemoteWorker

    def __init__(self, spec: ModelSpec, transport: httpx.BaseTransport | None = None) -> None:
        if spec.remote is None:
            raise ValueError(f"{spec.id!r} is not a remote model")
        self.spec = spec
        self.remote = spec.remote
        url = urlsplit(self.remote.base_url)
        self.host = url.hostname
        self.region = f"remote:{url.netloc}"
        self.where = f"{spec.id} at {url.netloc}"
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # trust_env=False: proxies from the environment must not redirect where a model's traffic goes.
        self.client = httpx.Client(base_url=self.remote.base_url + "/", timeout=httpx.Timeout(self.remote.timeout),
                                   trust_env=False, transport=transport or DeadlineTransport(limits), limits=limits)

    def close(self) -> None:
        self.client.close()

    # -- requests --------------------------------------------------------------------------

    def check_offline(self) -> None:
        """With the offline guard on, refuse before any connection unless the server is on loopback."""
        if offline_guard.offline_enabled() and not is_loopback(self.host):
            error = sdk.ServerError(f"offline mode is on, so remote model {self.where} was not contacted; "
                                    "turn the offline guard off, or give this model a local fallback", 503)
            error.offline = True
            raise error from offline_guard.OfflineError(f"remote model {self.where}")

    def headers(self) -> dict[str, str]:
        """The bearer key from the environment variable the entry names (read per request, so it can rotate).
        Answers are asked for unencoded: a compressed body could expand past every bound at once."""
        headers = {"Accept-Encoding": "identity"}
        name = self.remote.api_key_env
        if not name:
            return headers
        key = os.environ.get(name)
        if not key:
            raise sdk.AuthenticationError(f"remote model {self.where} reads its API key from ${name}, which is not set")
        return {**headers, "Authorization": f"Bearer {key}"}

    def secrets(self) -> tuple[str, ...]:
        """What must never be passed on from a remote's messages: the key, should the remote echo it."""
        key = os.environ.get(self.remote.api_key_env) if self.remote.api_key_env else None
        return (key,) if key else ()

    def failure(self, what: str, status: int = 502) -> sdk.ServerError:
        """A ServerError naming this remote; ``what`` may hold the remote's words, so it is scrubbed."""
        return sdk.ServerError(f"remote {self.where} {scrub(what, self.secrets())}", status)

    def send(self, method: str, path: str, expects: tuple[str, ...] = (), deadline: Deadline | None = None,
             **kwargs: Any) -> httpx.Response:
        """The remote's 2xx response of an ``expects`` content type, its body unread; anything else as the
        SDK's errors, after retries. Sending and waiting for the headers end by ``deadline``'s time, at which
        its error is raised.

        Connection failures, 429 and 503 are retried with exponential backoff (at least the
        Retry-After the server asks for) while the model's timeout and the deadline allow.
        """
        self.check_offline()
        headers = self.headers()
        ends, on_deadline = deadline if deadline is not None else (None, None)
        retry_until = time.monotonic() + self.remote.timeout
        if ends is not None:
            retry_until = min(retry_until, ends)
        attempt = 0
        while True:
            retry_after = None
            try:
                with within(ends):
                    request = self.client.build_request(method, path, headers=headers, **kwargs)
                    response = self.client.send(request, stream=True)
            except httpx.TimeoutException as exc:
                if ends is not None and on_deadline is not None and time.monotonic() >= ends - 0.05:
                    raise on_deadline() from exc
                if isinstance(exc, httpx.ConnectTimeout):
                    error, retryable = sdk.TimeoutError(f"connecting to remote {self.where} timed out after "
                                                        f"{self.remote.timeout:g}s"), True
                else:
                    error, retryable = sdk.TimeoutError(f"remote {self.where} did not answer within "
                                                        f"{self.remote.timeout:g}s ({type(exc).__name__})"), False
            except httpx.ConnectError as exc:
                error, retryable = sdk.ServerError(f"cannot reach remote {self.where}: {_reason(exc)}; "
                                                   "is the server running?", 502), True
            except httpx.HTTPError as exc:
                error, retryable = self.failure(f"failed: {type(exc).__name__}: {exc}"), False
            else:
                status = response.status_code
                if 200 <= status < 300 and (not expects or _media_type(response).startswith(expects)):
                    return response
                try:
                    error, retryable = self._refusal(response, expects, deadline), status in (429, 503)
                finally:
                    response.close()
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
            wait = max(FIRST_BACKOFF * 2 ** attempt * random.uniform(0.8, 1.2), retry_after or 0.0)
            if not retryable or attempt >= self.remote.max_retries or time.monotonic() + wait > retry_until:
                raise error
            logger.info("remote %s: %s; retry %d in %.2fs", self.where, error, attempt + 1, wait)
            time.sleep(wait)
            attempt += 1

    def _refusal(self, response: httpx.Response, expects: tuple[str, ...],
                 deadline: Deadline | None) -> sdk.PolarGridError:
        """The error a response that is not the answer stands for: a 2xx of another type, a redirect or any
        other status below 400 is a 502; an error status is the remote's error, its body read only so far."""
        status = response.status_code
        if 200 <= status < 300:
            got = _media_type(response) or "no content type"
            return self.failure(f"answered HTTP {status} with {got}, not {' or '.join(expects)}")
        if status < 400:
            moved = response.headers.get("Location")
            return self.failure(f"answered HTTP {status}" + (f" (to {moved!r})" if moved else "")
                                + "; remote.base_url must be the server's /v1 root, and redirects are not followed")
        ends = time.monotonic() + self.remote.timeout
        if deadline is not None:
            ends = min(ends, deadline[0])
        body = b""
        try:
            with within(ends):
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) >= ERROR_BODY_BYTES:
                        break
        except httpx.HTTPError:
            pass    # the status says what failed; the message is what arrived of it
        return error_for_status(status, body[:ERROR_BODY_BYTES], retry_after_seconds(response.headers.get(
            "Retry-After")), self.where, self.secrets())

    def open(self, forward: Forward, deadline: Deadline | None = None) -> ResponseItems:
        """Send ``forward`` now (so a refusal is raised here, where fallback can act) and return its reply's
        items, read later by whoever reads the request's stream."""
        forward.where = self.where
        forward.max_chunks = self.remote.max_chunks
        expects = forward.expects or EXPECTED_TYPES[forward.reply]
        if forward.form is not None:
            form = {**forward.form, "model": self.remote.model}
            response = self.send("POST", forward.path, expects, deadline, data=form, files=forward.files)
        else:
            body = {**(forward.body or {}), "model": self.remote.model}
            if forward.reply == "events":
                body.update(stream=True, stream_options={"include_usage": True})
            response = self.send("POST", forward.path, expects, deadline, json=body)
        items = ResponseItems(response)
        try:
            items.start(self._reply(response, forward.reply, items))
            if forward.reply == "events":
                self._first_event(items, deadline)
        except BaseException:
            items.close()
            raise
        return items

    def _first_event(self, items: ResponseItems, deadline: Deadline | None) -> None:
        """Read a stream's first event now, so that a stream that fails before it (no events at all, an error
        event, a malformed or oversized one) is refused here, where fallback can act."""
        ends = deadline[0] if deadline is not None else None
        try:
            with within(ends):
                items.peek()
        except sdk.TimeoutError as exc:
            if deadline is not None and time.monotonic() >= deadline[0] - 0.05:
                raise deadline[1]() from exc
            raise

    def _reply(self, response: httpx.Response, reply: str, items: ResponseItems) -> Iterator[Any]:
        declared, bound = response.headers.get("Content-Length", ""), self.remote.max_response_bytes
        if declared.isdigit() and int(declared) > bound:
            raise self.failure(f"sent {BoundExceeded('an answer', bound, 'max_response_bytes')} (Content-Length "
                               f"{declared})")
        if reply == "events":
            return self._payloads(response, items)
        if reply == "bytes":
            return self._checked(counted(response.iter_bytes(BYTES_CHUNK), self.remote.max_response_bytes))
        return self._checked(self._whole(response))

    def _whole(self, response: httpx.Response) -> Iterator[bytes]:
        yield b"".join(counted(response.iter_bytes(), self.remote.max_response_bytes))

    def _checked(self, items: Iterator[Any]) -> Iterator[Any]:
        try:
            yield from items
        except httpx.HTTPError as exc:
            raise self._lost(exc) from exc
        except BoundExceeded as exc:
            raise self.failure(f"sent {exc}") from exc

    def _payloads(self, response: httpx.Response, items: ResponseItems) -> Iterator[dict[str, Any]]:
        """The JSON payloads of a streamed answer. Closing them closes the HTTP connection, which is how
        the remote learns that nobody is reading and stops generating."""
        remote = self.remote
        stream_lines = items.rest = lines(counted(response.iter_bytes(), remote.max_response_bytes),
                                          remote.max_sse_line_bytes)
        events = 0
        try:
            for payload in sse_payloads(stream_lines, remote.max_sse_event_bytes):
                if "error" in payload and not payload.get("choices"):
                    raise error_in_stream(payload, self.where, self.secrets())
                events += 1
                yield payload
        except httpx.HTTPError as exc:
            raise self._lost(exc) from exc
        except BoundExceeded as exc:
            raise self.failure(f"sent {exc}") from exc
        except SSEFormatError as exc:
            raise self.failure(f"sent a malformed stream: {exc}") from exc
        if not events:
            raise self.failure("sent an event stream with no events")
        items.complete = True

    def _lost(self, exc: httpx.HTTPError) -> sdk.PolarGridError:
        if isinstance(exc, httpx.TimeoutException):
            return sdk.TimeoutError(f"remote {self.where} stopped sending for {self.remote.timeout:g}s")
        return self.failure(f"broke the connection: {type(exc).__name__}: {exc}")

    # -- health ----------------------------------------------------------------------------

    def probe(self) -> str:
        """'up' when GET {base_url}/models answers 200 with JSON, 'offline' when the guard forbids asking, else
        'down'. At most PROBE_TIMEOUT seconds in all, however slowly the remote answers; the body is not read."""
        try:
            self.check_offline()
        except sdk.ServerError:
            return "offline"
        try:
            headers = self.headers()
        except sdk.AuthenticationError:
            headers = {}
        timeout = min(PROBE_TIMEOUT, self.remote.timeout)
        try:
            with within(time.monotonic() + timeout):
                request = self.client.build_request("GET", "models", headers=headers, timeout=timeout)
                response = self.client.send(request, stream=True)
            response.close()
        except httpx.HTTPError as exc:
            logger.info("remote %s is down: %s", self.where, _reason(exc))
            return "down"
        if response.status_code != 200 or _media_type(response) != "application/json":
            logger.info("remote %s answered GET /models with HTTP %d (%s)", self.where, response.status_code,
                        _media_type(response) or "no content type")
            return "down"
        return "up"


EXPECTED_TYPES = {"events": ("text/event-stream",), "body": ("application/json",),
                  "bytes": ("audio/", "application/octet-stream")}


def _media_type(response: httpx.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip().lower()


DRAIN_LINES = 8      # lines read past [DONE] for the body's end; a remote that sends more loses its keep-alive
DRAIN_SECONDS = 0.25  # how long the body's end may take to arrive after [DONE]


class _ReleaseGuard(httpx.SyncByteStream):
    """The response body's stream, noting under the items' lock the moment its connection is given back."""

    def __init__(self, inner: httpx.SyncByteStream, released: Callable[[], None]) -> None:
        self._inner, self._released = inner, released

    def __iter__(self) -> Iterator[bytes]:
        yield from self._inner

    def close(self) -> None:
        self._released()
        self._inner.close()


class ResponseItems:
    """Items read from a remote's streamed response.

    ``close()`` closes the response whether or not reading began; after a complete event stream it first
    reads the body's end (briefly), so the keep-alive connection serves the next request. ``interrupt()``,
    from another thread, ends a read in progress by shutting the connection down, but never once the
    connection has been given back to the pool, where another request may be using it.
    """

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.rest: Iterator[bytes] | None = None  # the body's lines left after the last event
        self.complete = False                    # the event stream ended normally ([DONE] or its end)
        self._items: Iterator[Any] = iter(())
        self._peeked: list[Any] = []
        self._lock = threading.Lock()
        self._released = False
        response.stream = _ReleaseGuard(response.stream, self._mark_released)  # type: ignore[arg-type]

    def start(self, items: Iterator[Any]) -> None:
        self._items = items

    def peek(self) -> None:
        """Read the first item now; iterating gives it first."""
        with contextlib.suppress(StopIteration):
            self._peeked.append(next(self._items))

    def __iter__(self) -> ResponseItems:
        return self

    def __next__(self) -> Any:
        return self._peeked.pop() if self._peeked else next(self._items)

    def _mark_released(self) -> None:
        with self._lock:
            self._released = True

    def interrupt(self) -> None:
        with self._lock:
            if self._released:
                return
            stream = self.response.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        try:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()
            if self.complete and self.rest is not None and not self._released:
                self._finish_body(self.rest)
        finally:
            self.response.close()

    def _finish_body(self, rest: Iterator[bytes]) -> None:
        """Best effort: the answer is complete, so a remote slow to end its body only loses its connection."""
        cancel = run_at(time.monotonic() + DRAIN_SECONDS, self.interrupt)
        try:
            with contextlib.suppress(httpx.HTTPError, BoundExceeded):
                for count, _ in enumerate(rest, 1):
                    if count >= DRAIN_LINES:
                        return
        finally:
            cancel()


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    return text


def remote_factory(spec: ModelSpec, path: str, settings: Any) -> RemoteBackend:
    """The factories seam for ``[models.remote]`` entries: nothing loads, a client is made."""
    return RemoteBackend(spec)


remote_factory.forwards = True  # type: ignore[attr-defined]
