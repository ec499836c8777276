"""A single-producer, single-consumer result stream between a model's worker thread and its caller.

The worker pushes items; the caller reads them with a plain ``for`` loop or with
``async for``. Closing the stream (explicitly, by leaving a ``with`` block, or when
the reader is garbage-collected) marks it cancelled, and the worker stops the
generation at its next step.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

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

    def abandon(self) -> None:
        """close() for finalizers (it takes no lock)."""
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
