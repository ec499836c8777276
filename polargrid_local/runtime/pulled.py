"""PulledStream: a result stream read on its reader's own thread, for work that runs elsewhere.

A local model's worker thread produces items into a ResultStream (streams.py). A remote model's work runs
on another server, so no thread of ours needs to produce anything: the reader reads the remote's response
itself, and other threads can still stop it (a client that left, an unload, the time limit). One janitor
thread serves every such stream: time limits, short timers, and streams abandoned to the garbage collector.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .channel import ResultStream, StreamCancelled

T = TypeVar("T")


class PulledStream(Generic[T]):
    """Items of a blocking iterator, read on the reader's own thread: no producer thread, no handoff.

    For work that runs elsewhere, such as a remote server's token stream: each ``next`` reads the next item
    itself, so an item costs one thread wake-up instead of two (a producer's, then the reader's), and
    opening the stream starts no thread. ``async for`` starts a pump thread on first use, so an event loop
    never blocks on a read. ``close()`` and ``abort()`` from another thread stop a read in progress with
    ``interrupt`` (which shuts the connection); the reader then ends the stream: cleanly after a close,
    with the abort's error after an abort. Past ``deadline`` the stream is aborted with ``on_deadline()``,
    a blocked read included. The source's ``close`` and ``on_end`` run once, never under this stream's lock.
    """

    def __init__(self, source: Iterator[T], deadline: float | None = None,
                 on_deadline: Callable[[], BaseException] | None = None, interrupt: Callable[[], None] | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        self._source: Iterator[T] | None = source
        self._lock = threading.Lock()
        self._reading = False
        self._cancelled = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._on_deadline = on_deadline
        self._interrupt = interrupt
        self._on_end = on_end
        self._pump: ResultStream[T] | None = None
        _JANITOR.start()
        if deadline is not None:
            _JANITOR.watch(deadline, self)

    @property
    def cancelled(self) -> bool:
        """True once the reader closed the stream, the engine aborted it, or its time limit passed."""
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done

    def __iter__(self) -> PulledStream[T]:
        return self

    def __next__(self) -> T:
        pump = self._pump
        return next(pump) if pump is not None else self._pull()

    def _pull(self) -> T:
        with self._lock:
            ended = self._cancelled.is_set() and self._claim_end()
            if not self._done:
                self._reading = True
                source = self._source
        if ended:
            self._release()
        if self._done:
            raise self._error if self._error is not None else StopIteration
        try:
            item = next(source)  # type: ignore[arg-type]
        except BaseException as exc:
            with self._lock:
                if self._error is None and not self._cancelled.is_set() and not isinstance(exc, StopIteration):
                    self._error = exc      # the source's own failure; after a close or an abort, theirs wins
                ended = self._claim_end()
                error = self._error
            if ended:
                self._release()
            if error is None:
                raise StopIteration from None
            if error is exc:
                raise
            raise error from exc
        with self._lock:
            self._reading = False
            ended = self._cancelled.is_set() and self._claim_end()
        if ended:   # closed or aborted while this read succeeded: free the source now, not at the next read
            self._release()
        return item

    def _claim_end(self) -> bool:
        """With the lock held: mark the stream ended; True for the one call that must release it."""
        self._reading = False
        self._cancelled.set()
        if self._done:
            return False
        self._done = True
        return True

    def _release(self) -> None:
        """Once, outside the lock: close the source, then tell the owner."""
        source, on_end, self._source, self._on_end = self._source, self._on_end, None, None
        _JANITOR.forget()
        try:
            close = getattr(source, "close", None)
            if close is not None:
                close()
        finally:
            if on_end is not None:
                on_end()

    def _stop(self, error: BaseException | None) -> None:
        with self._lock:
            if error is not None and self._error is None and not self._done:
                self._error = error
            reading = self._reading
            self._cancelled.set()
            ended = not reading and self._claim_end()
        if ended:
            self._release()
        elif reading and self._interrupt is not None:
            self._interrupt()

    def close(self) -> None:
        """Stop reading: the source is closed (a remote sees its connection close and stops generating)."""
        pump = self._pump
        if pump is not None:
            pump.close()
        self._stop(None)

    def abort(self, error: BaseException) -> None:
        """The engine cuts the request short: the reader gets ``error``."""
        pump = self._pump
        if pump is not None:
            pump.abort(error)
        self._stop(error)

    def abandon(self) -> None:
        """close() for finalizers, which must not take locks: a janitor thread closes it soon."""
        if self._done:
            return
        self._cancelled.set()
        _JANITOR.abandon(self)

    def _expire(self) -> None:
        if not self._done:
            self.abort(self._on_deadline() if self._on_deadline is not None
                       else TimeoutError("the request ran past its time limit"))

    def __aiter__(self) -> PulledStream[T]:
        return self

    async def __anext__(self) -> T:
        if self._pump is None:
            with self._lock:
                if self._pump is None:
                    self._pump = ResultStream()
                    threading.Thread(target=self._run_pump, args=(self._pump,), name="polargrid-pump",
                                     daemon=True).start()
        try:
            return await self._pump.__anext__()
        except asyncio.CancelledError:
            self.close()       # the pump thread may be blocked in a read: interrupt it
            raise

    def _run_pump(self, pump: ResultStream[T]) -> None:
        """For an async reader: read on this thread, hand each item over."""
        try:
            while True:
                try:
                    item = self._pull()
                except StopIteration:
                    pump.finish()
                    return
                pump.push(item)
        except StreamCancelled:
            self._stop(None)
            pump.finish()
        except BaseException as exc:
            pump.finish(exc)

    def __enter__(self) -> PulledStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            self.abandon()


class _Janitor:
    """One daemon thread for every PulledStream: it aborts a stream at its time limit (which interrupts a
    blocked read), runs short timers (a bounded wait for a body's end), and closes streams that finalizers
    abandoned (a finalizer may run on a thread that holds the very locks a close takes, so it only leaves
    the stream here, with a lock-free append)."""

    POLL = 1.0  # seconds: how soon an abandoned stream is closed

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._timers: list[tuple[float, int, Any]] = []     # (when, order, weakref to a stream | callable)
        self._abandoned: deque[PulledStream[Any]] = deque()
        self._order = itertools.count()
        self._ended = 0   # streams released since the last compaction: their entries are dead weight
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._cond:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="polargrid-janitor", daemon=True)
                    self._thread.start()

    def watch(self, deadline: float, stream: PulledStream[Any]) -> None:
        """Abort ``stream`` with its deadline error at ``deadline`` (``time.monotonic()``) unless it ended."""
        self._add(deadline, weakref.ref(stream))

    def call_at(self, when: float, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn`` on the janitor's thread at ``when``; returns a cancel function."""
        cancelled = threading.Event()
        self._add(when, lambda: None if cancelled.is_set() else fn())
        return cancelled.set

    def _add(self, when: float, entry: Any) -> None:
        with self._cond:
            if self._ended > 1024 and self._ended * 2 > len(self._timers):
                self._compact()
            heapq.heappush(self._timers, (when, next(self._order), entry))
            if self._timers[0][2] is entry:
                self._cond.notify()

    def _compact(self) -> None:
        """With the lock held: drop the entries of streams that have ended (each request leaves one)."""
        self._timers = [t for t in self._timers if not isinstance(t[2], weakref.ref)
                        or ((stream := t[2]()) is not None and not stream.done)]
        heapq.heapify(self._timers)
        self._ended = 0

    def forget(self) -> None:
        self._ended += 1   # approximate under races, which is all compaction needs

    def abandon(self, stream: PulledStream[Any]) -> None:
        self._abandoned.append(stream)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                wait = self.POLL if not self._timers else min(self.POLL, self._timers[0][0] - now)
                if wait > 0:
                    self._cond.wait(wait)
                    now = time.monotonic()
                due = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
            for entry in due:
                if isinstance(entry, weakref.ref):
                    stream = entry()
                    if stream is not None:
                        _quietly(stream._expire)
                else:
                    _quietly(entry)
            while self._abandoned:
                _quietly(self._abandoned.popleft().close)


def run_at(when: float, fn: Callable[[], None]) -> Callable[[], None]:
    """Run ``fn`` on the janitor thread at ``when`` (``time.monotonic()``); returns a function that cancels it."""
    _JANITOR.start()
    return _JANITOR.call_at(when, fn)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:   # a failing close must not stop the janitor
        logging.getLogger("polargrid_local").debug("closing a stream failed", exc_info=True)


_JANITOR = _Janitor()
