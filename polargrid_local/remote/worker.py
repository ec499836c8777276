"""RemoteWorker: the ModelWorker of a remote model, running each job on its own thread.

A local model has one owner thread because one process holds its weights; a remote model's
work happens elsewhere, so its streams must not queue behind one another: each relays its
own HTTP response concurrently.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from ..streams import ResultStream, StreamCancelled
from ..limits import DEFAULT_LIMITS, Limits
from ..worker import JobContext, JobFn, limited_stream, unloaded_error

logger = logging.getLogger("polargrid_local")


class RemoteWorker:
    """Same interface as ModelWorker (submit, queue_depth, alive, close, wait_freed); no queue, one thread per job."""

    def __init__(self, name: str, backend: Any, limits: Limits = DEFAULT_LIMITS) -> None:
        self.name = name
        self.limits = limits
        self.backend = backend
        self._active = 0
        self._streams: set[ResultStream[Any]] = set()
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

    def submit(self, fn: JobFn) -> tuple[ResultStream[Any], JobContext]:
        """Start the job on a new thread; returns the stream its results arrive on."""
        stream: ResultStream[Any] = limited_stream(self.limits)
        ctx = JobContext(stream=stream, submitted_at=time.perf_counter())
        with self._lock:
            if self._closed:
                raise self._close_reason or unloaded_error(self.name)
            self._active += 1
            self._streams.add(stream)
        threading.Thread(target=self._drive, args=(fn, ctx), name=f"polargrid-remote-{self.name}",
                         daemon=True).start()
        return stream, ctx

    def _drive(self, fn: JobFn, ctx: JobContext) -> None:
        ctx.started_at = ctx.started_at or time.perf_counter()
        results = None
        try:
            results = fn(self.backend, ctx)
            for result in results:
                ctx.stream.push(result)
            ctx.stream.finish()
        except StreamCancelled:
            ctx.stream.finish()
        except BaseException as exc:  # handed to the caller
            logger.debug("remote job on %s failed: %r", self.name, exc)
            ctx.stream.finish(exc)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
            with self._lock:
                self._active -= 1
                self._streams.discard(ctx.stream)
                last = self._closed and self._active == 0
            if last:
                self._free_backend()

    def close(self, reason: BaseException | None = None) -> None:
        """Refuse new jobs and end the streams in flight with ``reason`` (a 503 by default); the HTTP client
        is closed when the last relay thread has stopped."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason or unloaded_error(self.name)
            streams, idle = list(self._streams), self._active == 0
        for stream in streams:
            stream.abort(self._close_reason)
        if idle:
            self._free_backend()

    def wait_freed(self, timeout: float) -> bool:
        """Wait until the HTTP client is closed; False while a relay thread is still stopping."""
        return self.freed.wait(timeout)

    def _free_backend(self) -> None:
        close = getattr(self.backend, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self.freed.set()
