"""One owner thread per loaded model: callers submit jobs, the worker runs them in order.

The backend belongs to its thread: only that thread runs jobs on it and only that thread frees it,
after its last job has stopped. ``close`` ends every queued and running request with an error at
once (the running work stops at its next step) and lets the thread free the backend on its way out.
"""
from __future__ import annotations

import gc
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..errors import RateLimitError, ServerError, invalid
from ..errors import TimeoutError as RequestTimeout
from ..limits import DEFAULT_LIMITS, Limits
from .channel import ResultStream, StreamCancelled
from .compute import set_native_name
from .interfaces import Job, JobContext, Scheduler

logger = logging.getLogger("polargrid_local")

B = TypeVar("B")

IDLE_WAIT = 0.005  # seconds a worker waits for new work while its running prompts all wait on a paced source
WORKER_NAME = "pg-worker"


_NOTHING = object()


class WorkerClosed(RuntimeError):
    """The model was unloaded while a request waited for it."""


def request_deadline(limits: Limits) -> tuple[float, Callable[[], BaseException]]:
    """When a request starting now must end (``time.monotonic()``), and the SDK error it then ends with."""
    timeout = limits.request_timeout_s
    return time.monotonic() + timeout, lambda: RequestTimeout(
        f"the request took longer than the server's limit of {timeout:g} s (request_timeout_s) and was stopped")


def limited_stream(limits: Limits, producer_alive: Callable[[], bool] | None = None) -> ResultStream[Any]:
    """A request's result stream, ended with the SDK's TimeoutError past ``limits.request_timeout_s``."""
    deadline, on_deadline = request_deadline(limits)
    return ResultStream(deadline=deadline, on_deadline=on_deadline, producer_alive=producer_alive)


def unloaded_error(name: str, why: str = "was unloaded") -> ServerError:
    return ServerError(f"model {name!r} {why} before this request finished; retry the request", 503)


class ModelWorker(Generic[B]):
    """Owns one backend; runs submitted jobs on its own thread (generation jobs batched by the backend's scheduler).

    Each item a job yields goes to the caller's ResultStream. When the caller closes its stream, the engine
    closes the worker, or the request's time is up, the job is stopped at its next item (or batch step).
    """

    region = "local"

    def __init__(self, name: str, backend: B, limits: Limits = DEFAULT_LIMITS) -> None:
        self.name = name
        self.backend: B | None = backend
        self.limits = limits
        self._scheduler: Scheduler | None = getattr(backend, "scheduler", None)
        self._n_parallel = getattr(backend, "n_parallel", None)
        self._max_queue = getattr(backend, "max_queue", None)
        self._jobs: queue.Queue[tuple[Job, JobContext] | None] = queue.Queue()
        self._lock = threading.Lock()   # submit and close: nothing is queued after close drains the queue
        self._closed = False
        self._close_reason: BaseException | None = None
        self._queued_cost = 0            # prompts queued, not yet taken by the thread
        self._in_hand = 0                # prompts the thread is preparing (not yet in the scheduler)
        self._streams: weakref.WeakSet[ResultStream[Any]] = weakref.WeakSet()
        self.freed = threading.Event()   # set by the thread once the backend is released
        self._thread = threading.Thread(target=self._run, name=f"polargrid-{name}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closed

    @property
    def queue_depth(self) -> int:
        """Prompts queued or running on this model."""
        with self._lock:
            return self._depth()

    def _depth(self) -> int:
        depth = self._queued_cost + self._in_hand
        scheduler = self._scheduler
        if scheduler is not None:
            return depth + scheduler.active + scheduler.queued
        return depth

    def submit(self, work: Job) -> tuple[ResultStream[Any], JobContext]:
        """Queue a job; returns the stream its results arrive on. A batched job counts ``job.cost`` prompts."""
        job = work
        cost = job.cost
        with self._lock:
            if self._closed:
                raise self._close_reason or unloaded_error(self.name)
            if job.batched and self._max_queue is not None:
                capacity = self._n_parallel + self._max_queue
                if cost > capacity:
                    raise invalid(f"this request has {cost} prompts, but model {self.name!r} takes at most "
                                  f"{capacity} at once (n_parallel + max_queue)", field="prompt")
                if self._depth() + cost > capacity:
                    raise RateLimitError(f"model {self.name!r} is serving {self._n_parallel} requests with "
                                         f"{self._max_queue} more queued; retry shortly", retry_after=1)
            stream = limited_stream(self.limits, producer_alive=self._thread.is_alive)
            ctx = JobContext(stream=stream, submitted_at=time.perf_counter())
            self._streams.add(stream)
            self._queued_cost += cost
            self._jobs.put((job, ctx))
        return stream, ctx

    def close(self, reason: BaseException | None = None) -> None:
        """Stop accepting jobs and end every queued and running request with ``reason`` (a 503 by default).

        Returns at once; the thread stops the running work at its next step and then frees the
        backend (``freed`` is set when it has). Idempotent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._close_reason = reason or unloaded_error(self.name)
            while True:
                try:
                    self._jobs.get_nowait()
                except queue.Empty:
                    break
            self._queued_cost = 0
            self._jobs.put(None)
            streams = list(self._streams)
        for stream in streams:
            stream.abort(self._close_reason)

    def wait_freed(self, timeout: float) -> bool:
        """Wait until the thread has released the backend; False if it is still finishing a step."""
        if threading.current_thread() is self._thread:
            return False
        return self.freed.wait(timeout)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        set_native_name(WORKER_NAME)   # the OS name of every model worker thread (OpenMP threads inherit it)
        try:
            self._serve()
        except BaseException as exc:  # a bug here must not strand callers: end them, then free the model
            logger.exception("worker of %s stopped", self.name)
            self.close(ServerError(f"model {self.name!r} failed: {type(exc).__name__}: {exc}", 500))
        finally:
            self._free_backend()

    def _next_job(self, busy: bool, progressed: bool) -> tuple[Job, JobContext] | None:
        """The next queued job: wait for one when idle, take one if there is one while decoding, and wait a
        moment when every running prompt waits on a paced source (so the thread does not spin)."""
        try:
            if not busy:
                return self._jobs.get()
            if progressed:
                return self._jobs.get_nowait()
            return self._jobs.get(timeout=IDLE_WAIT)
        except queue.Empty:
            return _NOTHING  # type: ignore[return-value]

    def _serve(self) -> None:
        scheduler = self._scheduler
        progressed = True
        while True:
            item = self._next_job(scheduler is not None and scheduler.busy, progressed)
            if item is None:
                return
            if item is not _NOTHING:
                job, ctx = item
                with self._lock:
                    self._queued_cost = max(0, self._queued_cost - job.cost)
                    self._in_hand = job.cost
                try:
                    if ctx.cancelled:
                        ctx.stream.finish()
                    elif job.batched and scheduler is not None:
                        self._admit(job, ctx, scheduler)
                    else:
                        ctx.mark_started()
                        self._drive(job, ctx)
                finally:
                    self._in_hand = 0
                if not self._jobs.empty():
                    continue  # admit everything that arrived before the next decode
            if scheduler is not None and scheduler.busy:
                try:
                    progressed = scheduler.step()
                except Exception as exc:  # a broken step must not kill the model's thread
                    logger.exception("batch step on %s failed", self.name)
                    scheduler.fail_all(ServerError(f"generation failed: {type(exc).__name__}: {exc}", 500))
                    progressed = True

    def _free_backend(self) -> None:
        backend, self.backend = self.backend, None
        try:
            if self._scheduler is not None:
                self._scheduler.close(self._close_reason or unloaded_error(self.name))
            close = getattr(backend, "close", None)
            if close is not None:
                close()
        except Exception:
            logger.exception("freeing %s failed", self.name)
        finally:
            del backend
            gc.collect()
            self.freed.set()

    def _admit(self, job: Job, ctx: JobContext, scheduler: Scheduler) -> None:
        """A generation job: prepared here (template, tokens, checks), then decoded with the others."""
        try:
            prompts = job.run(self.backend, ctx)
        except BaseException as exc:
            ctx.stream.finish(exc)
            return
        for prompt in prompts:
            scheduler.admit(prompt)

    def _drive(self, job: Job, ctx: JobContext) -> None:
        results = None
        try:
            results = job.run(self.backend, ctx)
            for result in results:
                ctx.stream.push(result)
            ctx.stream.finish()   # after an abort the stream already ended with its error
        except StreamCancelled:
            ctx.stream.finish()
        except BaseException as exc:  # handed to the caller, never kills the worker
            logger.debug("job on %s failed: %r", self.name, exc)
            ctx.stream.finish(exc)
        finally:
            close = getattr(results, "close", None)
            if close is not None:
                close()
