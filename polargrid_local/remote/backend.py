"""RemoteBackend: one remote model's HTTP client: retries within a deadline, errors mapped, the offline guard.

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
from .errors import error_for_status, error_in_stream, retry_after_seconds
from .forward import Forward
from .sse import SSEFormatError, sse_payloads
from .worker import RemoteWorker

logger = logging.getLogger("polargrid_local")

FIRST_BACKOFF = 0.25   # seconds before the first retry; doubles each time
BYTES_CHUNK = 16 * 1024  # bytes read at a time from a streamed binary answer (speech)
PROBE_TIMEOUT = 2.0    # seconds a health probe may take


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
        # trust_env=False: proxies from the environment must not redirect where a model's traffic goes.
        self.client = httpx.Client(base_url=self.remote.base_url + "/", timeout=httpx.Timeout(self.remote.timeout),
                                   trust_env=False, transport=transport,
                                   limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

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
        """The bearer key from the environment variable the entry names (read per request, so it can rotate)."""
        name = self.remote.api_key_env
        if not name:
            return {}
        key = os.environ.get(name)
        if not key:
            raise sdk.AuthenticationError(f"remote model {self.where} reads its API key from ${name}, which is not set")
        return {"Authorization": f"Bearer {key}"}

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The remote's response with its body unread; errors as the SDK's, after retries.

        Connection failures, 429 and 503 are retried with exponential backoff (at least the
        Retry-After the server asks for) while the model's timeout allows.
        """
        self.check_offline()
        headers = self.headers()
        deadline = time.monotonic() + self.remote.timeout
        attempt = 0
        while True:
            retry_after = None
            try:
                request = self.client.build_request(method, path, headers=headers, **kwargs)
                response = self.client.send(request, stream=True)
            except httpx.ConnectTimeout:
                error, retryable = sdk.TimeoutError(f"connecting to remote {self.where} timed out after "
                                                    f"{self.remote.timeout:g}s"), True
            except httpx.TimeoutException as exc:
                error, retryable = sdk.TimeoutError(f"remote {self.where} did not answer within "
                                                    f"{self.remote.timeout:g}s ({type(exc).__name__})"), False
            except httpx.ConnectError as exc:
                error, retryable = sdk.ServerError(f"cannot reach remote {self.where}: {_reason(exc)}; "
                                                   "is the server running?", 502), True
            except httpx.HTTPError as exc:
                error, retryable = sdk.ServerError(f"remote {self.where} failed: {type(exc).__name__}: {exc}",
                                                   502), False
            else:
                if response.status_code < 400:
                    return response
                try:
                    body = response.read()
                finally:
                    response.close()
                retry_after = retry_after_seconds(response.headers.get("Retry-After"))
                error = error_for_status(response.status_code, body, retry_after, self.where)
                retryable = response.status_code in (429, 503)
            wait = max(FIRST_BACKOFF * 2 ** attempt * random.uniform(0.8, 1.2), retry_after or 0.0)
            if not retryable or attempt >= self.remote.max_retries or time.monotonic() + wait > deadline:
                raise error
            logger.info("remote %s: %s; retry %d in %.2fs", self.where, error, attempt + 1, wait)
            time.sleep(wait)
            attempt += 1

    def open(self, forward: Forward) -> ResponseItems:
        """Send ``forward`` now (so a refusal is raised here, where fallback can act) and return its reply's
        items, read later by whoever reads the request's stream."""
        forward.where = self.where
        if forward.form is not None:
            form = {**forward.form, "model": self.remote.model}
            response = self.send("POST", forward.path, data=form, files=forward.files)
        else:
            body = {**(forward.body or {}), "model": self.remote.model}
            if forward.reply == "events":
                body.update(stream=True, stream_options={"include_usage": True})
            response = self.send("POST", forward.path, json=body)
        if forward.reply == "events":
            return self.payloads(response)
        if forward.reply == "bytes":
            return self.raw(response, BYTES_CHUNK)
        items = ResponseItems(response)
        items.start(self._body(response))
        return items

    def _body(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield response.read()
        except httpx.HTTPError as exc:
            raise self._lost(exc) from exc

    def payloads(self, response: httpx.Response) -> ResponseItems:
        """The JSON payloads of a streamed answer. Closing them closes the HTTP connection, which is how
        the remote learns that nobody is reading and stops generating."""
        items = ResponseItems(response)
        items.start(self._payloads(response, items))
        return items

    def raw(self, response: httpx.Response, chunk: int) -> ResponseItems:
        """The body of a streamed answer (audio), ``chunk`` bytes at a time as they arrive."""
        items = ResponseItems(response)
        items.start(self._bytes(response, chunk))
        return items

    def _bytes(self, response: httpx.Response, chunk: int) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(chunk)
        except httpx.HTTPError as exc:
            raise self._lost(exc) from exc

    def _payloads(self, response: httpx.Response, items: ResponseItems) -> Iterator[dict[str, Any]]:
        lines = items.rest = response.iter_lines()
        try:
            for payload in sse_payloads(lines):
                if "error" in payload and not payload.get("choices"):
                    raise error_in_stream(payload, self.where)
                yield payload
        except httpx.HTTPError as exc:
            raise self._lost(exc) from exc
        except SSEFormatError as exc:
            raise sdk.ServerError(f"remote {self.where} sent a malformed stream: {exc}", 502) from exc
        items.complete = True

    def _lost(self, exc: httpx.HTTPError) -> sdk.PolarGridError:
        if isinstance(exc, httpx.TimeoutException):
            return sdk.TimeoutError(f"remote {self.where} stopped sending for {self.remote.timeout:g}s")
        return sdk.ServerError(f"the connection to remote {self.where} broke: {type(exc).__name__}: {exc}", 502)

    # -- health ----------------------------------------------------------------------------

    def probe(self) -> str:
        """'up' when GET {base_url}/models answers 200, 'offline' when the guard forbids asking, else 'down'."""
        try:
            self.check_offline()
        except sdk.ServerError:
            return "offline"
        try:
            headers = self.headers()
        except sdk.AuthenticationError:
            headers = {}
        try:
            response = self.client.get("models", headers=headers, timeout=min(PROBE_TIMEOUT, self.remote.timeout))
        except httpx.HTTPError as exc:
            logger.info("remote %s is down: %s", self.where, _reason(exc))
            return "down"
        if response.status_code != 200:
            logger.info("remote %s answered GET /models with HTTP %d", self.where, response.status_code)
            return "down"
        return "up"


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
        self.rest: Iterator[str] | None = None   # the body's lines left after the last event
        self.complete = False                    # the event stream ended normally ([DONE] or its end)
        self._items: Iterator[Any] = iter(())
        self._lock = threading.Lock()
        self._released = False
        response.stream = _ReleaseGuard(response.stream, self._mark_released)  # type: ignore[arg-type]

    def start(self, items: Iterator[Any]) -> None:
        self._items = items

    def __iter__(self) -> ResponseItems:
        return self

    def __next__(self) -> Any:
        return next(self._items)

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

    def _finish_body(self, lines: Iterator[str]) -> None:
        """Best effort: the answer is complete, so a remote slow to end its body only loses its connection."""
        cancel = run_at(time.monotonic() + DRAIN_SECONDS, self.interrupt)
        try:
            with contextlib.suppress(httpx.HTTPError):
                for count, _ in enumerate(lines, 1):
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
