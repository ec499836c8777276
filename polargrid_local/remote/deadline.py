"""An overall deadline for sending a request to a remote, which httpx's timeouts do not give.

httpx bounds each read and write, so a remote that drips one byte a second holds a request for ever.
``within(deadline)`` makes every socket operation of the requests sent on this thread inside it take at
most the time left: each read and write waits ``min(its own timeout, time left)``, and none starts once
the deadline has passed. It covers connecting, uploading the request (a transcription's audio included)
and waiting for the status line and headers; the body is read later, by whoever reads the request's
stream, and PulledStream's janitor ends that read at the same deadline by shutting the socket down.
"""
from __future__ import annotations

import contextlib
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

WRITE_SLICE = 64 * 1024   # bytes sent per socket write, so a slow reader is checked against the deadline often

_local = threading.local()


@contextlib.contextmanager
def within(deadline: float | None) -> Iterator[None]:
    """Requests sent on this thread inside the block end by ``deadline`` (``time.monotonic()``); None: no bound."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = deadline if previous is None or deadline is None else min(previous, deadline)
    try:
        yield
    finally:
        _local.deadline = previous


def _bounded(timeout: float | None, timeout_error: type[Exception]) -> float | None:
    """``timeout`` cut to the time left before this thread's deadline."""
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise timeout_error("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose reads and writes end by the deadline of the thread using it."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            self._inner.write(bytes(view[:WRITE_SLICE]), _bounded(timeout, httpcore.WriteTimeout))
            view = view[WRITE_SLICE:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                  timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname,
                                                     _bounded(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_tcp(host, port, _bounded(timeout, httpcore.ConnectTimeout),
                                                       local_address, socket_options))

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._inner.connect_unix_socket(path, _bounded(timeout, httpcore.ConnectTimeout),
                                                               socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


class DeadlineTransport(httpx.HTTPTransport):
    """httpx's own transport (connection pool, keep-alive, error mapping) over connections that honour
    ``within``. Proxies are not supported: remote traffic never takes one (``trust_env=False``)."""

    def __init__(self, limits: httpx.Limits) -> None:
        super().__init__(trust_env=False, limits=limits)
        self._pool.close()
        # httpx exposes no network backend of its own: the pool is rebuilt as httpx builds it, with ours.
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections, keepalive_expiry=limits.keepalive_expiry,
            network_backend=_DeadlineBackend())
