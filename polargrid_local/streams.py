"""A single-producer, single-consumer result stream between a model's worker thread and its caller.

The worker pushes items; the caller reads them with a plain ``for`` loop or with
``async for``. Closing the stream (explicitly, by leaving a ``with`` block, or when
the reader is garbage-collected) marks it cancelled, and the worker stops the
generation at its next step.
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
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")

_END = object()
WAIT_SLICE = 1.0  # how often a waiting reader checks its deadline and that its producer is alive


class StreamCancelled(Exception):
    """Raised inside the producer when the reader has gone away."""


class ResultStream(Generic[T]):
    """Items produced on a worker thread, consumed by one reader (sync or async).

    ``deadline`` (a ``time.monotonic()`` value) bounds the whole request: past it the stream ends
    with ``on_deadline()`` and the producer sees ``cancelled``. ``producer_alive`` lets a waiting
    reader notice a producer thread that died without ending the stream.
    """

    def __init__(self, deadline: float | None = None, on_deadline: Callable[[], BaseException] | None = None,
                 producer_alive: Callable[[], bool] | None = None) -> None:
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._cancelled = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._async_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
        self._deadline = deadline
        self._on_deadline = on_deadline
        self._producer_alive = producer_alive

    # -- producer side (worker thread) -------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the reader has closed the stream, the engine aborted it, or its deadline passed."""
        if not self._cancelled.is_set() and self._deadline is not None and time.monotonic() > self._deadline:
            self.abort(self._deadline_error())
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done

    def push(self, item: T) -> None:
        """Hand one item to the reader; raises StreamCancelled if the reader left."""
        if self._cancelled.is_set():
            raise StreamCancelled()
        self._put(item)

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream, optionally with an error the reader will see raised. Later ends are ignored."""
        with self._lock:
            waiter = self._end(error)
        _wake(waiter)

    def abort(self, error: BaseException) -> None:
        """The engine cuts the request short: the reader gets ``error`` now, the producer stops at its next step."""
        with self._lock:
            waiter = self._end(error)
        self._cancelled.set()
        _wake(waiter)

    def _end(self, error: BaseException | None):
        """With the lock held: append the end marker once; returns an async waiter to wake."""
        if self._done:
            return None
        self._error, self._done = error, True
        self._items.append(_END)
        self._ready.notify()
        waiter, self._async_waiter = self._async_waiter, None
        return waiter

    def _put(self, item: Any) -> None:
        with self._lock:
            if self._done:
                return
            self._items.append(item)
            self._ready.notify()
            waiter, self._async_waiter = self._async_waiter, None
        _wake(waiter)

    # -- consumer side -----------------------------------------------------------------

    def _deadline_error(self) -> BaseException:
        if self._on_deadline is not None:
            return self._on_deadline()
        return TimeoutError("the request ran past its time limit")

    def _wait_slice(self) -> float | None:
        if self._deadline is None and self._producer_alive is None:
            return None
        if self._deadline is None:
            return WAIT_SLICE
        return max(0.0, min(WAIT_SLICE, self._deadline - time.monotonic()))

    def _check_locked(self) -> None:
        """With the lock held and nothing to read: end the stream if its time is up or its producer died."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._end(self._deadline_error())
            self._cancelled.set()
        elif self._producer_alive is not None and not self._producer_alive():
            from polargrid.errors import ServerError

            self._end(ServerError("the model's worker stopped before finishing this request", 503))
            self._cancelled.set()

    def _pop(self) -> Any:
        item = self._items.popleft()
        if item is _END:
            self._items.appendleft(_END)  # stay finished for repeated next() calls
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def __iter__(self) -> ResultStream[T]:
        return self

    def __next__(self) -> T:
        with self._ready:
            while not self._items:
                self._ready.wait(self._wait_slice())
                if not self._items:
                    self._check_locked()
            return self._pop()

    def __aiter__(self) -> ResultStream[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            with self._lock:
                if not self._items and self._wait_slice() == 0.0:
                    self._check_locked()
                if self._items:
                    try:
                        return self._pop()
                    except StopIteration:
                        raise StopAsyncIteration from None
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._async_waiter = (loop, future)
                timeout = self._wait_slice()
            try:
                await asyncio.wait({future}, timeout=timeout)
            except asyncio.CancelledError:
                self.close()
                raise
            if not future.done():
                with self._lock:
                    if not self._items:
                        self._check_locked()

    def close(self) -> None:
        """Stop reading: the producer is told to stop at its next step."""
        self._cancelled.set()

    def __enter__(self) -> ResultStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._cancelled.set()


def _wake(waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None) -> None:
    if waiter is not None:
        loop, future = waiter
        try:
            loop.call_soon_threadsafe(_resolve, future)
        except RuntimeError:  # the reader's loop has closed; nobody is waiting
            pass


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
    blocked read) and closes streams that finalizers abandoned (a finalizer may run on a thread that holds
    the very locks a close takes, so it only leaves the stream here, with a lock-free append)."""

    POLL = 1.0  # seconds: how soon an abandoned stream is closed

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadlines: list[tuple[float, int, weakref.ref[PulledStream[Any]]]] = []
        self._abandoned: deque[PulledStream[Any]] = deque()
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def watch(self, deadline: float, stream: PulledStream[Any]) -> None:
        with self._cond:
            heapq.heappush(self._deadlines, (deadline, next(self._order), weakref.ref(stream)))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="polargrid-janitor", daemon=True)
                self._thread.start()
            elif self._deadlines[0][2]() is stream:
                self._cond.notify()

    def abandon(self, stream: PulledStream[Any]) -> None:
        self._abandoned.append(stream)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                wait = self.POLL if not self._deadlines else min(self.POLL, self._deadlines[0][0] - now)
                if wait > 0:
                    self._cond.wait(wait)
                    now = time.monotonic()
                expired = []
                while self._deadlines and self._deadlines[0][0] <= now:
                    expired.append(heapq.heappop(self._deadlines)[2]())
            for stream in expired:
                if stream is not None:
                    _quietly(stream._expire)
            while self._abandoned:
                _quietly(self._abandoned.popleft().close)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:   # a failing close must not stop the janitor
        logging.getLogger("polargrid_local").debug("closing a stream failed", exc_info=True)


_JANITOR = _Janitor()
