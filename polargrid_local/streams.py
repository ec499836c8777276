"""A single-producer, single-consumer result stream between a model's worker thread and its caller.

The worker pushes items; the caller reads them with a plain ``for`` loop or with
``async for``. Closing the stream (explicitly, by leaving a ``with`` block, or when
the reader is garbage-collected) marks it cancelled, and the worker stops the
generation at its next step.
"""
from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_END = object()


class StreamCancelled(Exception):
    """Raised inside the producer when the reader has gone away."""


class ResultStream(Generic[T]):
    """Items produced on a worker thread, consumed by one reader (sync or async)."""

    def __init__(self) -> None:
        self._items: deque[Any] = deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._cancelled = threading.Event()
        self._done = False
        self._error: BaseException | None = None
        self._async_waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    # -- producer side (worker thread) -------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the reader has closed the stream."""
        return self._cancelled.is_set()

    def push(self, item: T) -> None:
        """Hand one item to the reader; raises StreamCancelled if the reader left."""
        if self._cancelled.is_set():
            raise StreamCancelled()
        self._put(item)

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream, optionally with an error the reader will see raised."""
        with self._lock:
            if self._done:
                return
            self._error = error
        self._put(_END)

    def _put(self, item: Any) -> None:
        with self._lock:
            if item is _END:
                self._done = True
            self._items.append(item)
            self._ready.notify()
            waiter, self._async_waiter = self._async_waiter, None
        if waiter is not None:
            loop, future = waiter
            loop.call_soon_threadsafe(_resolve, future)

    # -- consumer side -----------------------------------------------------------------

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
                self._ready.wait()
            return self._pop()

    def __aiter__(self) -> ResultStream[T]:
        return self

    async def __anext__(self) -> T:
        while True:
            with self._lock:
                if self._items:
                    try:
                        return self._pop()
                    except StopIteration:
                        raise StopAsyncIteration from None
                loop = asyncio.get_running_loop()
                future: asyncio.Future[None] = loop.create_future()
                self._async_waiter = (loop, future)
            try:
                await future
            except asyncio.CancelledError:
                self.close()
                raise

    def close(self) -> None:
        """Stop reading: the producer is told to stop at its next step."""
        self._cancelled.set()

    def __enter__(self) -> ResultStream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._cancelled.set()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
