"""One thread that watches every client connection: read deadlines, departed clients, refused sockets.

A handler thread blocked in ``recv`` cannot time itself out against a total deadline (a client that sends
one byte a second defeats a per-read timeout), so the watch shuts the socket's read side when a phase's
deadline passes; the blocked read then returns end-of-file. While a route works for a client, the watch
polls that client's socket: when the client hangs up, it closes the route's streams, so the engine stops
generating for nobody. On shutdown it closes them with a reason, so the routes answer 503.
"""
from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

IDLE, HEAD, BODY = "idle", "head", "body"
GONE, SHUTDOWN = "client gone", "server shutting down"

_EVENTS = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0)


class Connection:
    """One client connection: its current read deadline, the work done for it, and why that work stopped."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.phase: str | None = None
        self.deadline: float | None = None
        self.expired: str | None = None      # the phase whose deadline passed
        self.reason: str | None = None       # GONE or SHUTDOWN once the work was stopped
        self._work: list[Any] = []
        self._lock = threading.Lock()

    def add(self, stream: Any) -> Any:
        """Close ``stream`` if the client leaves (or the server stops) before it ends; returns it."""
        with self._lock:
            stop_now = self.reason is not None
            if not stop_now:
                self._work.append(stream)
        if stop_now:
            stream.close()
        return stream

    def discard(self, stream: Any) -> None:
        with self._lock:
            if stream in self._work:
                self._work.remove(stream)

    @property
    def working(self) -> bool:
        return bool(self._work)

    def stop(self, reason: str) -> None:
        """Close every stream of this connection (thread-safe; a remote stream being read is interrupted)."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            work, self._work = self._work, []
        for stream in work:
            stream.close()

    @contextlib.contextmanager
    def watch(self) -> Iterator[Callable[[Any], Any]]:
        """``with conn.watch() as watch: stream = watch(open_stream())``: the streams opened inside are closed
        when the client leaves; on the way out, a stopped request raises ClientGone or a 503."""
        opened: list[Any] = []

        def watch(stream: Any) -> Any:
            opened.append(stream)
            return self.add(stream)

        try:
            yield watch
        except Exception:
            self.raise_if_stopped()
            raise
        finally:
            for stream in opened:
                self.discard(stream)
        self.raise_if_stopped()

    def raise_if_stopped(self) -> None:
        from polargrid import errors as sdk

        if self.reason == GONE:
            raise ClientGone()
        if self.reason == SHUTDOWN:
            raise sdk.ServerError("the server is shutting down; the request was stopped", 503)


class ClientGone(Exception):
    """The client hung up while its request was being worked on: there is nobody to answer."""


class ConnectionWatch:
    """The watch thread and the connections it knows about."""

    def __init__(self, tick: float = 0.05) -> None:
        self.tick = tick
        self._connections: set[Connection] = set()
        self._lingering: list[tuple[socket.socket, float]] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polargrid-http-watch", daemon=True)
        self._thread.start()

    def open(self, sock: socket.socket) -> Connection:
        conn = Connection(sock)
        with self._lock:
            self._connections.add(conn)
        return conn

    def close(self, conn: Connection) -> None:
        with self._lock:
            self._connections.discard(conn)

    def expect(self, conn: Connection, phase: str | None, seconds: float | None = None) -> None:
        """The connection is now reading ``phase`` and must finish it within ``seconds`` (None: no deadline)."""
        conn.phase = phase
        conn.deadline = None if phase is None or seconds is None else time.monotonic() + seconds

    def linger(self, sock: socket.socket, seconds: float = 1.0) -> None:
        """Close a refused socket soon, reading what the client sent meanwhile, so our answer is not lost
        to a reset."""
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
        with self._lock:
            self._lingering.append((sock, time.monotonic() + seconds))

    def close_idle(self) -> None:
        """End every connection that is waiting for its next request (at shutdown)."""
        with self._lock:
            idle = [c for c in self._connections if c.phase == IDLE]
        for conn in idle:
            conn.expired = IDLE
            _shutdown(conn.sock, socket.SHUT_RDWR)

    def stop_all(self, reason: str) -> int:
        """Stop the work of every connection; returns how many had work."""
        with self._lock:
            busy = [c for c in self._connections if c.working]
        for conn in busy:
            conn.stop(reason)
        return len(busy)

    def shutdown(self) -> None:
        self._stopped.set()

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._step()
            except Exception:  # the watch must outlive any one odd socket
                time.sleep(self.tick)

    def _step(self) -> None:
        now = time.monotonic()
        with self._lock:
            connections = list(self._connections)
            lingering, self._lingering = self._lingering, []
        poller = select.poll()
        watched: dict[int, Connection] = {}
        for conn in connections:
            if conn.deadline is not None and now > conn.deadline:
                conn.expired, conn.deadline = conn.phase, None
                # Idle: close quietly. Mid-request: stop reading but keep the write side for a 408.
                _shutdown(conn.sock, socket.SHUT_RDWR if conn.phase == IDLE else socket.SHUT_RD)
            elif conn.working and conn.reason is None:
                with contextlib.suppress(OSError, ValueError):
                    watched[conn.sock.fileno()] = conn
                    poller.register(conn.sock, _EVENTS)
        kept = []
        for sock, until in lingering:
            if _drained(sock) or now > until:
                sock.close()
            else:
                kept.append((sock, until))
        if kept:
            with self._lock:
                self._lingering.extend(kept)
        if not watched:
            self._stopped.wait(self.tick)
            return
        ready = poller.poll(1000 * self.tick)
        for fd, events in ready:
            found = watched.get(fd)
            if found is not None and _departed(found.sock, events):
                found.stop(GONE)
        if ready:
            self._stopped.wait(self.tick)  # a client with pipelined bytes stays readable: do not spin


def _departed(sock: socket.socket, events: int) -> bool:
    """True if the peer closed or reset; bytes waiting (a pipelined request) mean it is still there."""
    if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
        return True
    try:
        peeked = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
    return peeked == b""


def _drained(sock: socket.socket) -> bool:
    """Read what is waiting on a refused socket; True once the client has closed."""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _shutdown(sock: socket.socket, how: int) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(how)
