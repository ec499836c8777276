"""Stream: the caller's view of one request, iterable with ``for`` or ``async for``; closing it cancels the work."""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from polargrid import errors as sdk
from polargrid.types import PGMetadata

from ..errors import as_server_error
from .interfaces import Channel, JobContext
from .worker import WorkerClosed

T = TypeVar("T")


class Stream(Generic[T]):
    """Chunks of one request as the worker produces them.

    Iterate it (sync or async), or use it as a context manager; ``close()`` stops the
    generation at its next token and frees the model for the next request.
    """

    def __init__(self, results: Channel[Any], ctx: JobContext, convert: Callable[[Any], list[T]],
                 load_seconds: float = 0.0, on_finish: Callable[[Stream[T]], None] | None = None,
                 tail: Callable[[], list[T]] | None = None) -> None:
        self._results = results
        self._ctx = ctx
        self._convert = convert
        self._tail = tail
        self._pending: deque[T] = deque()
        self._on_finish = on_finish
        self._finished = False
        self.load_seconds = load_seconds
        self.finished_at: float | None = None
        self.chunker: Any = None               # what turns events into chunks; the folds read its usage
        self.content_type: str | None = None   # for byte streams (speech): the MIME type of the format
        self.on_close: Callable[[], None] | None = None  # once, when it ends or is closed (the pool's in-flight count)
        self.region = "local"                  # where the work ran: "local", or "remote:<host:port>"
        self.folder: Callable[[list[T], PGMetadata], Any] | None = None  # (items, metadata) -> the whole response

    def metadata(self) -> PGMetadata:
        """Where the request ran (``region``) and the real split of its time: load, queue, inference."""
        end = self.finished_at or time.perf_counter()
        started = self._ctx.started_at or end
        queue = self._ctx.queue_seconds if self._ctx.started_at else end - self._ctx.submitted_at
        inference = max(0.0, end - started)
        return PGMetadata(region=self.region, latency_ms=round(1000 * (self.load_seconds + queue + inference)),
                          model_load_time_ms=round(1000 * self.load_seconds), queue_time_ms=round(1000 * queue),
                          inference_time_ms=round(1000 * inference))

    def collect(self) -> list[T]:
        """Every item left, for a fold. A reader with ``check_collected(count)`` bounds how many (a remote's
        answer arrives as chunks nobody else bounds)."""
        check = getattr(self.chunker, "check_collected", None)
        items: list[T] = []
        for item in self:
            items.append(item)
            if check is not None:
                check(len(items))
        return items

    async def acollect(self) -> list[T]:
        """``collect()`` for ``async for`` readers."""
        check = getattr(self.chunker, "check_collected", None)
        items: list[T] = []
        async for item in self:
            items.append(item)
            if check is not None:
                check(len(items))
        return items

    def fold(self, items: list[T]) -> Any:
        """The whole response (the non-streaming call's answer) from every item read from this stream."""
        if self.folder is None:
            raise TypeError("this stream has no response to fold into")
        return self.folder(items, self.metadata())

    def _fail(self, exc: BaseException) -> BaseException:
        self._finish()
        if isinstance(exc, sdk.PolarGridError):
            return exc
        if isinstance(exc, WorkerClosed):
            return sdk.ServerError(str(exc), 503)
        return as_server_error(exc, "generation")

    def _closed(self) -> None:
        callback, self.on_close = self.on_close, None
        if callback is not None:
            callback()

    def _finish(self) -> None:
        self._closed()
        if not self._finished:
            self._finished = True
            self.finished_at = time.perf_counter()
            if self._on_finish is not None:
                self._on_finish(self)

    def __iter__(self) -> Stream[T]:
        return self

    def _end(self) -> bool:
        """At the end of the results: queue the tail items once; False when nothing is left."""
        if self._tail is not None:
            self._pending.extend(self._tail())
            self._tail = None
            if self._pending:
                return True
        self._finish()
        return False

    def __next__(self) -> T:
        while not self._pending:
            try:
                event = next(self._results)
            except StopIteration:
                if self._end():
                    break
                raise
            except BaseException as exc:
                raise self._fail(exc) from exc
            self._pending.extend(self._convert(event))
        return self._pending.popleft()

    def __aiter__(self) -> Stream[T]:
        return self

    async def __anext__(self) -> T:
        while not self._pending:
            try:
                event = await self._results.__anext__()
            except StopAsyncIteration:
                if self._end():
                    break
                raise
            except BaseException as exc:
                if isinstance(exc, (GeneratorExit, KeyboardInterrupt)) or type(exc).__name__ == "CancelledError":
                    raise
                raise self._fail(exc) from exc
            self._pending.extend(self._convert(event))
        return self._pending.popleft()

    def close(self) -> None:
        """Stop reading; the model stops generating for this request."""
        self._results.close()
        self._closed()

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Stream[T]:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self._results.abandon()   # a finalizer must not block on the channel's locks
        self._closed()
