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
from ..worker import JobContext, JobFn, WorkerClosed

logger = logging.getLogger("polargrid_local")


class RemoteWorker:
    """Same interface as ModelWorker (submit, queue_depth, close); no queue, one thread per job."""

    def __init__(self, name: str, backend: Any) -> None:
        self.name = name
        self.backend = backend
        self._active = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Requests in flight to the remote."""
        with self._lock:
            return self._active

    def submit(self, fn: JobFn) -> tuple[ResultStream[Any], JobContext]:
        """Start the job on a new thread; returns the stream its results arrive on."""
        if self._closed:
            raise WorkerClosed(f"model {self.name!r} is unloaded")
        stream: ResultStream[Any] = ResultStream()
        ctx = JobContext(stream=stream, submitted_at=time.perf_counter())
        with self._lock:
            self._active += 1
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

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs; streams in flight end when their readers stop or the remote finishes."""
        self._closed = True
