"""PulledStream: a stream read on its reader's thread, stopped from other threads through a real socket."""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import polargrid
import pytest

from polargrid_local.runtime.pulled import PulledStream


class SocketLines:
    """A blocking source: one item per line received on a socket (as a remote's token stream is)."""

    def __init__(self) -> None:
        self.ours, self.theirs = socket.socketpair()
        self.file = self.ours.makefile("rb")
        self.closed = threading.Event()

    def __iter__(self) -> SocketLines:
        return self

    def __next__(self) -> str:
        line = self.file.readline()
        if not line:
            raise polargrid.ServerError("the connection broke", 502)
        if line == b"END\n":
            raise StopIteration
        return line.decode().strip()

    def send(self, *lines: str) -> None:
        self.theirs.sendall("".join(f"{line}\n" for line in lines).encode())

    def interrupt(self) -> None:
        self.ours.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.file.close()
        self.ours.close()
        self.theirs.close()
        self.closed.set()


def pulled(source: SocketLines, **kwargs) -> tuple[PulledStream[str], list[int]]:
    ends: list[int] = []
    return PulledStream(source, interrupt=source.interrupt, on_end=lambda: ends.append(1), **kwargs), ends


def later(seconds: float, fn) -> None:
    threading.Timer(seconds, fn).start()


def next_within(stream: PulledStream[str], seconds: float = 5):
    """next(stream) on a helper thread: returns what it returned or raised; fails the test if it hangs."""
    outcome: list = []

    def read() -> None:
        try:
            outcome.append(next(stream))
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(seconds)
    assert outcome, f"the read was still blocked after {seconds}s"
    return outcome[0]


def test_items_are_read_in_order_and_the_end_closes_the_source():
    source = SocketLines()
    stream, ends = pulled(source)
    source.send("a", "b", "END")
    assert list(stream) == ["a", "b"]
    assert source.closed.is_set() and ends == [1] and stream.done
    with pytest.raises(StopIteration):  # stays ended
        next(stream)


def test_close_from_another_thread_ends_a_blocked_read_cleanly():
    source = SocketLines()
    stream, ends = pulled(source)
    source.send("a")
    assert next(stream) == "a"
    later(0.2, stream.close)      # the reader is blocked: nothing more is coming
    assert isinstance(next_within(stream), StopIteration)
    assert source.closed.is_set() and ends == [1]


def test_abort_from_another_thread_gives_the_reader_its_error():
    source = SocketLines()
    stream, ends = pulled(source)
    later(0.2, lambda: stream.abort(polargrid.ServerError("model 'x' was unloaded", 503)))
    error = next_within(stream)
    assert isinstance(error, polargrid.ServerError) and error.status_code == 503 and "unloaded" in str(error)
    assert source.closed.is_set() and ends == [1]


def test_close_before_any_read_closes_the_source_without_reading():
    source = SocketLines()
    stream, ends = pulled(source)
    stream.close()
    assert source.closed.is_set() and ends == [1]
    with pytest.raises(StopIteration):
        next(stream)


def test_a_source_failure_reaches_the_reader():
    source = SocketLines()
    stream, ends = pulled(source)
    source.theirs.close()       # the remote hangs up mid-stream
    with pytest.raises(polargrid.ServerError, match="broke"):
        next(stream)
    assert ends == [1]


def test_past_its_time_limit_the_stream_ends_with_the_limit_error():
    source = SocketLines()
    stream, ends = pulled(source, deadline=time.monotonic() + 0.3,
                          on_deadline=lambda: polargrid.TimeoutError("past request_timeout_s"))
    source.send("a", "b")
    assert next(stream) == "a"
    time.sleep(0.4)                    # between reads: the stream ends at its limit, the source is closed
    assert source.closed.wait(5) and ends == [1]
    with pytest.raises(polargrid.TimeoutError):
        next(stream)


def test_async_readers_get_the_items_and_cancelling_the_task_closes_the_source():
    source = SocketLines()
    stream, ends = pulled(source)
    source.send("a", "b", "END")

    async def read_all():
        return [item async for item in stream]

    assert asyncio.run(read_all()) == ["a", "b"]
    assert ends == [1]

    blocked = SocketLines()
    stream, ends = pulled(blocked)

    async def cancel_a_waiting_reader():
        async def read():
            async for _ in stream:
                pass
        task = asyncio.create_task(read())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_a_waiting_reader())
    assert blocked.closed.wait(5) and ends == [1]


def test_the_time_limit_ends_a_read_blocked_on_a_silent_source():
    source = SocketLines()
    stream, ends = pulled(source, deadline=time.monotonic() + 0.3,
                          on_deadline=lambda: polargrid.TimeoutError("past request_timeout_s"))
    error = next_within(stream, 5)     # nothing is ever sent: only the time limit can end this read
    assert isinstance(error, polargrid.TimeoutError)
    assert source.closed.is_set() and ends == [1]


def test_an_async_reader_that_closes_mid_stream_is_not_left_waiting():
    """The pump thread holds an item when the reader closes: its hand-over is refused, and the stream must
    still end for anyone reading on."""
    gate, closed = threading.Event(), threading.Event()

    def items():
        try:
            yield "a"
            gate.wait(5)               # "b" arrives only after the reader has closed
            yield "b"
        finally:
            closed.set()

    stream = PulledStream(items())

    async def scenario() -> list[str]:
        reader = stream.__aiter__()
        got = [await reader.__anext__()]
        stream.close()
        gate.set()
        with pytest.raises(StopAsyncIteration):
            while True:
                got.append(await asyncio.wait_for(reader.__anext__(), 5))
        return got

    assert asyncio.run(scenario()) == ["a"]
    assert closed.wait(5)


def test_a_stream_dropped_without_close_is_closed_by_the_janitor():
    import gc

    source = SocketLines()
    stream, ends = pulled(source)
    source.send("a")
    assert next(stream) == "a"
    del stream
    gc.collect()
    assert source.closed.wait(5) and ends == [1]


def test_a_remote_worker_closed_while_a_request_opens_ends_that_request(monkeypatch):
    from polargrid_local.remote import worker as remote_worker

    worker = remote_worker.RemoteWorker("far", backend=None)
    deadline = remote_worker.request_deadline

    def unload_meanwhile(limits):
        worker.close()                 # an unload lands between the worker's checks
        return deadline(limits)

    monkeypatch.setattr(remote_worker, "request_deadline", unload_meanwhile)
    source = SocketLines()
    source.send("a", "b", "END")
    stream, _ctx = worker.read(source)
    with pytest.raises(polargrid.ServerError) as info:
        next(stream)
    assert info.value.status_code == 503
    assert worker.queue_depth == 0 and worker.wait_freed(1) and source.closed.is_set()


def test_a_closed_remote_worker_refuses_a_request_and_closes_its_source():
    from polargrid_local.remote.worker import RemoteWorker

    worker = RemoteWorker("far", backend=None)
    worker.close()
    source = SocketLines()
    with pytest.raises(polargrid.ServerError):
        worker.read(source)
    assert source.closed.is_set() and worker.queue_depth == 0


def test_ended_streams_do_not_pile_up_in_the_time_limit_heap():
    from polargrid_local.runtime.pulled import _JANITOR

    before = len(_JANITOR._timers)
    for _ in range(3000):      # each request registers its time limit; ended ones must not stay for 600 s
        PulledStream(iter(()), deadline=time.monotonic() + 600).close()
    PulledStream(iter(()), deadline=time.monotonic() + 600).close()
    assert len(_JANITOR._timers) < before + 1600
