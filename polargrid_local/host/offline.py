"""The offline guard: while it is on, opening a socket to anything but loopback raises OfflineError.

Turned on by ``offline=True`` on PolarGrid/PolarGridSync/LocalEngine or ``POLARGRID_LOCAL_OFFLINE=1``.
Remote model entries (the only code that opens non-loopback connections at run time) check
``offline_enabled()`` to fail fast or fall back to a local model.

What it covers: every Python-level way out of this interpreter through the socket modules.

- ``socket.socket``: ``connect``, ``connect_ex``, ``sendto`` and ``sendmsg`` (UDP, with an address);
- ``_socket.socket``, the raw type: replaced by a guarded subclass, so sockets made from it after the guard
  is on are checked the same way;
- ``socket.create_connection``;
- name and address lookups, in ``socket`` and ``_socket``: ``getaddrinfo``, ``gethostbyname``,
  ``gethostbyname_ex``, ``gethostbyaddr`` and ``getnameinfo`` (asyncio, http.client, urllib, httpx and
  requests all go through these).

Names are checked before any lookup: only IP literals and ``localhost`` resolve, and reverse lookups run
only for loopback (or with ``NI_NUMERICHOST``), so a refused name never reaches DNS; a refused address is
refused before ``connect`` or ``send*`` runs, so no packet leaves the machine.

What it cannot cover: other processes (``polargrid-local pull`` starts ``pip`` subprocesses that talk to the
package index; any subprocess you start), C and C++ libraries that open their own sockets (libcurl, gRPC, a
CUDA or vendor library), references to the original functions taken before the guard was turned on
(``from socket import create_connection`` at import time), and sockets connected before it. To close
those too, run the process in a network namespace that holds only loopback: ``unshare -n`` (Linux),
``docker run --network none``, or ``PrivateNetwork=yes`` in a systemd unit.
"""
from __future__ import annotations

import _socket
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
_SOCKET_METHODS = ("connect", "connect_ex", "sendto", "sendmsg")
_LOOKUPS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")


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
        _originals.clear()
        _originals.update({name: getattr(socket.socket, name) for name in _SOCKET_METHODS})
        _originals.update({f"socket.{name}": getattr(socket, name) for name in _LOOKUPS})
        _originals.update({f"_socket.{name}": getattr(_socket, name) for name in _LOOKUPS})
        _originals.update(create_connection=socket.create_connection, raw=_socket.socket)
        for name in _SOCKET_METHODS:
            setattr(socket.socket, name, _GUARDED_METHODS[name])
        for name in _LOOKUPS:
            setattr(socket, name, _guarded_lookup(name, _originals[f"socket.{name}"]))
            setattr(_socket, name, _guarded_lookup(name, _originals[f"_socket.{name}"]))
        socket.create_connection = _guarded_create_connection
        # _socket.SocketType stays the real type: isinstance checks against it keep holding for every socket
        _socket.socket = _guarded_raw_type(_originals["raw"])
        _enabled = True


def disable() -> None:
    """Turn the guard off again (tests of the guard itself use this)."""
    global _enabled
    with _lock:
        if not _enabled:
            return
        for name in _SOCKET_METHODS:
            setattr(socket.socket, name, _originals[name])
        for name in _LOOKUPS:
            setattr(socket, name, _originals[f"socket.{name}"])
            setattr(_socket, name, _originals[f"_socket.{name}"])
        socket.create_connection = _originals["create_connection"]
        _socket.socket = _originals["raw"]
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
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
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


def _check_address(sock: Any, address: Any, what: str) -> None:
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


def _guarded_sendmsg(self: socket.socket, buffers: Any, *args: Any) -> int:
    if len(args) >= 3 and args[2] is not None:   # (ancdata, flags, address): an address means a datagram out
        _check_address(self, args[2], "sendmsg to")
    return _originals["sendmsg"](self, buffers, *args)


_GUARDED_METHODS = {"connect": _guarded_connect, "connect_ex": _guarded_connect_ex, "sendto": _guarded_sendto,
                    "sendmsg": _guarded_sendmsg}


def _guarded_raw_type(raw: type) -> type:
    """A subclass of the raw ``_socket.socket`` with the same checks (its C methods cannot be replaced)."""

    class GuardedRawSocket(raw):
        __slots__ = ()

        def connect(self, address: Any) -> None:
            _check_address(self, address, "connect to")
            return raw.connect(self, address)

        def connect_ex(self, address: Any) -> int:
            _check_address(self, address, "connect to")
            return raw.connect_ex(self, address)

        def sendto(self, data: Any, *args: Any) -> int:
            _check_address(self, args[-1], "sendto")
            return raw.sendto(self, data, *args)

        def sendmsg(self, buffers: Any, *args: Any) -> int:
            if len(args) >= 3 and args[2] is not None:
                _check_address(self, args[2], "sendmsg to")
            return raw.sendmsg(self, buffers, *args)

    GuardedRawSocket.__name__ = GuardedRawSocket.__qualname__ = "socket"
    GuardedRawSocket.__module__ = raw.__module__
    return GuardedRawSocket


def _guarded_create_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    if not is_local_host(address[0]):
        raise _refuse("connection to", address)
    return _originals["create_connection"](address, *args, **kwargs)


def _lookup_allowed(name: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    if is_local_host(target):
        return True
    if name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
        return _is_ip_literal(target)     # a literal is parsed, not looked up
    if name == "getnameinfo":             # reverse DNS, unless only numbers are asked for
        flags = args[0] if args else kwargs.get("flags", 0)
        return bool(int(flags) & socket.NI_NUMERICHOST)
    return False                          # gethostbyaddr: a reverse lookup (or a forward one for a name)


def _guarded_lookup(name: str, original: Any) -> Any:
    def lookup(host: Any, *args: Any, **kwargs: Any) -> Any:
        target = host[0] if name == "getnameinfo" and isinstance(host, tuple) else host
        if not _lookup_allowed(name, target, args, kwargs):
            raise _refuse("name lookup of" if name != "gethostbyaddr" else "address lookup of", target)
        return original(host, *args, **kwargs)

    lookup.__name__ = lookup.__qualname__ = name
    lookup.__doc__ = getattr(original, "__doc__", None)
    return lookup
