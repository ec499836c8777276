"""One owner thread per loaded model: callers submit jobs, the worker runs them in order."""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import RateLimitError
from .streams import ResultStream, StreamCancelled

logger = logging.getLogger("polargrid_local")

B = TypeVar("B")

JobFn = Callable[[Any, "JobContext"], Iterator[Any]]


@dataclass
class JobContext:
    """What a running job can see: its timings and whether its reader has left."""

    stream: ResultStream[Any]
    submitted_at: float
    started_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    @property
    def queue_seconds(self) -> float:
        return max(0.0, self.started_at - self.submitted_at)


_NOTHING = object()


class WorkerClosed(RuntimeError):
    """The model was unloaded while a request waited for it."""


class ModelWorker(Generic[B]):
    """Owns one backend; runs submitted jobs one at a time on its own thread.

    A job is a function ``fn(backend, ctx)`` returning an iterator; each item it yields
    goes to the caller's ResultStream. When the caller closes its stream, the
    iterator is closed at its next item, so an abandoned generation stops at once.
    """

    def __init__(self, name: str, backend: B) -> None:
        self.name = name
        self.backend = backend
        self._jobs: queue.Queue[tuple[JobFn, JobContext] | None] = queue.Queue()
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name=f"polargrid-{name}", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        scheduler = getattr(self.backend, "scheduler", None)
        if scheduler is not None:
            return self._jobs.qsize() + scheduler.active + len(scheduler.waiting)
        return self._jobs.qsize() + (1 if self._busy else 0)

    def submit(self, fn: JobFn) -> tuple[ResultStream[Any], JobContext]:
        """Queue a job; returns the stream its results arrive on."""
        if self._closed:
            raise WorkerClosed(f"model {self.name!r} is unloaded")
        limit = getattr(self.backend, "max_queue", None)
        if getattr(fn, "batched", False) and limit is not None:
            if self.queue_depth >= self.backend.n_parallel + limit:
                raise RateLimitError(f"model {self.name!r} is serving {self.backend.n_parallel} requests with "
                                     f"{limit} more queued; retry shortly", retry_after=1)
        stream: ResultStream[Any] = ResultStream()
        ctx = JobContext(stream=stream, submitted_at=time.perf_counter())
        self._jobs.put((fn, ctx))
        return stream, ctx

    def close(self, timeout: float = 30.0) -> None:
        """Stop accepting jobs, cancel queued ones, wait for the running one to end."""
        if self._closed:
            return
        self._closed = True
        while True:
            try:
                pending = self._jobs.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending[1].stream.finish(WorkerClosed(f"model {self.name!r} was unloaded"))
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        scheduler = getattr(self.backend, "scheduler", None)
        while True:
            busy = scheduler is not None and scheduler.busy
            try:
                item = self._jobs.get(block=not busy)
            except queue.Empty:
                item = _NOTHING
            if item is None:
                if scheduler is not None:
                    scheduler.close()
                return
            if item is not _NOTHING:
                fn, ctx = item
                if ctx.cancelled:
                    ctx.stream.finish()
                elif getattr(fn, "batched", False) and scheduler is not None:
                    self._admit(fn, ctx, scheduler)
                else:
                    self._busy = True
                    ctx.started_at = time.perf_counter()
                    try:
                        self._drive(fn, ctx)
                    finally:
                        self._busy = False
                if not self._jobs.empty():
                    continue  # admit everything that arrived before the next decode
            if scheduler is not None and scheduler.busy:
                try:
                    scheduler.step()
                except Exception as exc:  # a broken step must not kill the model's thread
                    logger.exception("batch step on %s failed", self.name)
                    scheduler._fail_all(exc)

    def _admit(self, fn: JobFn, ctx: JobContext, scheduler) -> None:
        """A generation job: prepared here (template, tokens, checks), then decoded with the others."""
        ctx.started_at = time.perf_counter()
        try:
            prompts = fn(self.backend, ctx)
        except BaseException as exc:
            ctx.stream.finish(exc)
            return
        for prompt in prompts:
            scheduler.admit(prompt)

    def _drive(self, fn: JobFn, ctx: JobContext) -> None:
        results = None
        try:
            results = fn(self.backend, ctx)
            for result in results:
                ctx.stream.push(result)
            ctx.stream.finish()
        except StreamCancelled:
            ctx.stream.finish()
        except BaseException as exc:  # handed to the caller, never kills the worker
            logger.debug("job on %s failed: %r", self.name, exc)
            ctx.stream.finish(exc)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
