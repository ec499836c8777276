"""The offline guard: while it is on, opening a socket to anything but loopback raises OfflineError.

Turned on by ``offline=True`` on PolarGrid/PolarGridSync/LocalEngine or ``POLARGRID_LOCAL_OFFLINE=1``.
Remote model entries (the only code that opens non-loopback connections at run time) check
``offline_enabled()`` to fail fast or fall back to a local model.

The guard wraps ``socket.socket.connect``/``connect_ex``/``sendto``, ``socket.create_connection`` and
``socket.getaddrinfo`` (which asyncio, http.client, urllib, httpx and requests all go through). Names
are checked before any lookup: only IP literals and ``localhost`` resolve, so a refused name never
reaches DNS, and a refused address is refused before ``connect`` runs, so no packet leaves the machine.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
from typing import Any

OFFLINE_ENV = "POLARGRID_LOCAL_OFFLINE"


class OfflineError(ConnectionError):
    """A connection outside loopback was attempted while the offline guard is on; names the call site."""

    offline = True


_enabled = False
_lock = threading.Lock()
_originals: dict[str, Any] = {}
_LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


def offline_requested() -> bool:
    """True when the environment asks for the guard (POLARGRID_LOCAL_OFFLINE=1, true, yes or on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def offline_enabled() -> bool:
    """True while the guard is on in this process (or the environment asks for it)."""
    return _enabled or offline_requested()


def enable() -> None:
    """Turn the guard on for the whole process (idempotent)."""
    global _enabled
    with _lock:
        if _enabled:
            return
        _originals.update(connect=socket.socket.connect, connect_ex=socket.socket.connect_ex,
                          sendto=socket.socket.sendto, create_connection=socket.create_connection,
                          getaddrinfo=socket.getaddrinfo)
        socket.socket.connect = _guarded_connect
        socket.socket.connect_ex = _guarded_connect_ex
        socket.socket.sendto = _guarded_sendto
        socket.create_connection = _guarded_create_connection
        socket.getaddrinfo = _guarded_getaddrinfo
        _enabled = True


def disable() -> None:
    """Turn the guard off again (tests of the guard itself use this)."""
    global _enabled
    with _lock:
        if not _enabled:
            return
        socket.socket.connect = _originals["connect"]
        socket.socket.connect_ex = _originals["connect_ex"]
        socket.socket.sendto = _originals["sendto"]
        socket.create_connection = _originals["create_connection"]
        socket.getaddrinfo = _originals["getaddrinfo"]
        _enabled = False


def is_local_host(host: Any) -> bool:
    """True for loopback addresses, 'localhost', and the empty/None host (a wildcard bind)."""
    if host in (None, "", b""):
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    name = str(host).split("%", 1)[0].strip("[]").rstrip(".").lower()
    if name in _LOCAL_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_ip_literal(host: Any) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0].strip("[]"))
        return True
    except ValueError:
        return False


def call_site() -> str:
    """Where the refused call came from: the first frame outside the socket layers and this guard."""
    frame = sys._getframe(1)
    layers = (os.sep + "asyncio" + os.sep, os.sep + "http" + os.sep, os.sep + "urllib" + os.sep,
              os.sep + "httpcore", os.sep + "httpx", os.sep + "urllib3", os.sep + "requests" + os.sep,
              os.sep + "anyio" + os.sep)
    first = None
    while frame is not None:
        filename = frame.f_code.co_filename
        where = f"{filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        first = first or where
        inside = filename == __file__ or os.path.basename(filename) in ("socket.py", "ssl.py") or any(
            part in filename for part in layers)
        if not inside:
            return where
        frame = frame.f_back
    return first or "unknown"


def _refuse(what: str, target: Any) -> OfflineError:
    return OfflineError(f"offline guard ({OFFLINE_ENV}): {what} {target!r} refused; only loopback "
                        f"(127.0.0.0/8, ::1, localhost) is allowed. Called from {call_site()}")


def _check_address(sock: socket.socket, address: Any, what: str) -> None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # unix sockets, netlink...: never off the machine
    host = address[0] if isinstance(address, tuple) else address
    if not is_local_host(host):
        raise _refuse(what, address)


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check_address(self, address, "connect to")
    return _originals["connect"](self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check_address(self, address, "connect to")
    return _originals["connect_ex"](self, address)


def _guarded_sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _check_address(self, args[-1], "sendto")
    return _originals["sendto"](self, data, *args)


def _guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    if not is_local_host(address[0]):
        raise _refuse("connection to", address)
    return _originals["create_connection"](address, *args, **kwargs)


def _guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if not is_local_host(host) and not _is_ip_literal(host):
        raise _refuse("name lookup of", host)  # before the resolver: no DNS query is sent
    return _originals["getaddrinfo"](host, *args, **kwargs)
