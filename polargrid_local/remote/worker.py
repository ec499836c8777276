"""RemoteWorker: the ModelWorker of a remote model. Its work runs on another server; each request's reader
reads the remote's answer itself.

A local model has one owner thread because one process holds its weights. A remote model's work happens
elsewhere, so its streams must not queue behind one another, and nothing here needs a thread of its own:
each stream is a PulledStream over the remote's HTTP response, read by whoever reads the stream (a
handler thread of the HTTP facade, the caller's thread in process, a pump thread for ``async for``).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from ..limits import DEFAULT_LIMITS, Limits
from ..runtime.interfaces import JobContext
from ..runtime.pulled import PulledStream
from ..runtime.worker import request_deadline, unloaded_error
from .forward import Forward


def copy_error(error: BaseException) -> BaseException:
    """A shallow copy of an exception (its class, args and attributes), without calling its __init__."""
    twin = type(error).__new__(type(error))
    twin.args = error.args
    twin.__dict__.update(error.__dict__)
    return twin


class RemoteWorker:
    """The pool's side of ModelWorker (queue_depth, alive, close, wait_freed); no queue, no thread. Requests
    come in through ``submit`` (a Forward, sent at once) or ``read`` (any source of items)."""

    def __init__(self, name: str, backend: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.name = name
        self.limits = limits
        self.backend = backend
        self.region: str = getattr(backend, "region", "remote")
        self._active = 0
        self._streams: set[PulledStream[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._close_reason: BaseException | None = None
        self.freed = threading.Event()

    @property
    def alive(self) -> bool:
        return not self._closed

    @property
    def queue_depth(self) -> int:
        """Requests in flight to the remote."""
        with self._lock:
            return self._active

    def submit(self, work: Forward) -> tuple[PulledStream[Any], JobContext]:
        """Send the forwarded request now (a refusal is raised here, where fallback can act); its reply is read
        by whoever reads the returned stream. Timings start when it was sent."""
        with self._lock:
            if self._closed:
                raise self._close_reason or unloaded_error(self.name)
        sent = time.perf_counter()
        deadline = request_deadline(self.limits)   # sending, the answer's headers and its body, all within it
        stream, ctx = self.read(self.backend.open(work, deadline), deadline)
        ctx.submitted_at = sent   # its queue time: until the remote answered with headers
        return stream, ctx

    def read(self, source: Any, deadline: tuple[float, Callable[[], BaseException]] | None = None
             ) -> tuple[PulledStream[Any], JobContext]:
        """A stream of ``source``'s items (a remote response's ResponseItems), read by the stream's reader;
        ``source.interrupt()`` stops a read in progress when the stream is closed or aborted from elsewhere,
        and at ``deadline`` (the request's time limit from now unless given). The source is closed here if
        the worker refuses it (unloaded)."""
        now = time.perf_counter()
        with self._lock:
            refused = (self._close_reason or unloaded_error(self.name)) if self._closed else None
            if refused is None:
                self._active += 1
        if refused is not None:
            source.close()
            raise refused
        ends, on_deadline = deadline or request_deadline(self.limits)
        stream: PulledStream[Any] = PulledStream(source, ends, on_deadline, source.interrupt,
                                                 on_end=lambda: self._ended(stream))
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams.add(stream)
        if closed:   # closed while the request was being opened: it must not outlive the unload
            stream.abort(copy_error(self._close_reason or unloaded_error(self.name)))
        return stream, JobContext(stream=stream, submitted_at=now, started_at=now)

    def _ended(self, stream: PulledStream[Any] | None) -> None:
        with self._lock:
            self._active -= 1
            if stream is not None:
                self._streams.discard(stream)
            last = self._closed and self._active == 0
        if last:
            self._free_backend()

    def close(self, reason: BaseException | None = None) -> None:
        """Refuse new requests and end the streams in flight with ``reason`` (a 503 by default); the HTTP client
        is closed when the last of them has ended."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason or unloaded_error(self.name)
            streams, idle = list(self._streams), self._active == 0
        for stream in streams:   # each its own copy: readers on several threads raise them at once
            stream.abort(copy_error(self._close_reason))
        if idle:
            self._free_backend()

    def wait_freed(self, timeout: float) -> bool:
        """Wait until the HTTP client is closed; False while a stream is still being read."""
        return self.freed.wait(timeout)

    def _free_backend(self) -> None:
        close = getattr(self.backend, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self.freed.set()
