"""The offline guard: refusals happen before any connect or name lookup; loopback keeps working.

No test here sends a packet off this machine: the socket layer under the guard is replaced by a spy
that refuses (and records) anything but loopback, so even a broken guard cannot reach the network.
"""
from __future__ import annotations

import _socket
import asyncio
import http.client
import os
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from polargrid_local.host import offline
from polargrid_local.host.offline import OfflineError

ROOT = Path(__file__).resolve().parent.parent
TEST_NET = "192.0.2.1"  # TEST-NET-1: documentation only, never routed


LOOKUPS = ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")


@pytest.fixture
def spied():
    """The guard on top of spies: what reached the socket layer below the guard.

    Why no test here can send a packet off this machine, even with a broken guard: every call below the
    guard (connect, sendto, sendmsg, every name lookup, in ``socket`` and ``_socket``, and the raw
    ``_socket.socket`` type) is a spy that records it and refuses anything but loopback before the real
    call, and the only addresses used are TEST-NET-1 (192.0.2.0/24) and names under example.com.
    """
    was_on = offline._enabled
    offline.disable()
    real = {"connect": socket.socket.connect, "sendto": socket.socket.sendto, "sendmsg": socket.socket.sendmsg,
            "raw": _socket.socket, **{name: getattr(socket, name) for name in LOOKUPS},
            **{f"_{name}": getattr(_socket, name) for name in LOOKUPS}}
    reached: list[tuple[str, object]] = []

    def refuse_unless_local(what, host, address):
        reached.append((what, address))
        if isinstance(host, tuple):
            host = host[0]
        if not offline.is_local_host(host):
            raise RuntimeError(f"the spy refuses {what} {address!r}: the guard let it through")

    def connect(sock, address):
        refuse_unless_local("connect", address, address)
        return real["connect"](sock, address)

    def sendto(sock, data, *args):
        refuse_unless_local("sendto", args[-1], args[-1])
        return real["sendto"](sock, data, *args)

    def sendmsg(sock, buffers, *args):
        if len(args) >= 3:
            refuse_unless_local("sendmsg", args[2], args[2])
        return real["sendmsg"](sock, buffers, *args)

    class RawSpy(real["raw"]):
        def connect(self, address):
            refuse_unless_local("raw connect", address, address)
            return real["raw"].connect(self, address)

        def connect_ex(self, address):
            refuse_unless_local("raw connect", address, address)
            return real["raw"].connect_ex(self, address)

        def sendto(self, data, *args):
            refuse_unless_local("raw sendto", args[-1], args[-1])
            return real["raw"].sendto(self, data, *args)

    def lookup(name, original):
        def spy(host, *args, **kwargs):
            target = host[0] if isinstance(host, tuple) else host
            numeric = name == "getnameinfo" and args and args[0] & socket.NI_NUMERICHOST
            literal = isinstance(target, str) and target[:1].isdigit() and name in ("getaddrinfo", "gethostbyname",
                                                                                 "gethostbyname_ex")
            reached.append((name, target))
            if not (offline.is_local_host(target) or numeric or literal):
                raise RuntimeError(f"the spy refuses {name}({target!r}): the guard let it through")
            return original(host, *args, **kwargs)
        return spy

    socket.socket.connect, socket.socket.sendto, socket.socket.sendmsg = connect, sendto, sendmsg
    _socket.socket = RawSpy
    for name in LOOKUPS:
        setattr(socket, name, lookup(name, real[name]))
        setattr(_socket, name, lookup(name, real[f"_{name}"]))
    offline.enable()
    try:
        yield reached
    finally:
        offline.disable()
        socket.socket.connect, socket.socket.sendto, socket.socket.sendmsg = real["connect"], real["sendto"], \
            real["sendmsg"]
        _socket.socket = real["raw"]
        for name in LOOKUPS:
            setattr(socket, name, real[name])
            setattr(_socket, name, real[f"_{name}"])
        if was_on:
            offline.enable()


@pytest.fixture
def loopback_server():
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_connect_outside_loopback_is_refused_before_connect_runs(spied):
    sock = socket.socket()
    try:
        with pytest.raises(OfflineError) as info:
            sock.connect((TEST_NET, 80))
        with pytest.raises(OfflineError):
            sock.connect_ex((TEST_NET, 443))
    finally:
        sock.close()
    assert spied == []
    message = str(info.value)
    assert TEST_NET in message and "test_offline.py" in message and "test_connect_outside_loopback" in message
    assert info.value.offline is True and isinstance(info.value, ConnectionError)


def test_names_are_refused_before_any_lookup(spied):
    with pytest.raises(OfflineError, match="example.com"):
        socket.create_connection(("example.com", 80), timeout=1)
    with pytest.raises(OfflineError):
        socket.getaddrinfo("pypi.org", 443)
    with pytest.raises(urllib.error.URLError) as info:
        urllib.request.urlopen("http://example.com/", timeout=1)
    assert isinstance(info.value.reason, OfflineError)

    async def via_asyncio():
        await asyncio.open_connection(TEST_NET, 80)

    with pytest.raises(OfflineError):
        asyncio.run(via_asyncio())
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(OfflineError):
        udp.sendto(b"x", (TEST_NET, 53))
    udp.close()
    assert [host for what, host in spied if what == "getaddrinfo" and not offline.is_local_host(host)] == []
    assert [a for what, a in spied if what == "connect"] == []


def test_create_connection_refuses_before_any_lookup_or_connect(spied):
    """The wrapped create_connection itself refuses: no lookup and no connect below it ever runs."""
    for address in ((TEST_NET, 80), ("example.com", 443), ("2001:db8::1", 80)):
        with pytest.raises(OfflineError, match="connection to") as info:
            socket.create_connection(address, timeout=1)
        assert str(address[0]) in str(info.value) and "test_create_connection_refuses" in str(info.value)
    assert spied == []


def test_udp_sendmsg_is_refused_before_it_runs(spied):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        with pytest.raises(OfflineError, match="sendmsg"):
            udp.sendmsg([b"x"], [], 0, (TEST_NET, 53))
    finally:
        udp.close()
    assert spied == []


def test_name_and_address_lookups_are_refused_before_the_resolver(spied):
    """gethostbyname(_ex), gethostbyaddr and getnameinfo, in socket and in _socket: none reaches the OS."""
    for module in (socket, _socket):
        for name, args in (("gethostbyname", ("example.com",)), ("gethostbyname_ex", ("example.com",)),
                           ("gethostbyaddr", (TEST_NET,)), ("gethostbyaddr", ("example.com",)),
                           ("getnameinfo", ((TEST_NET, 80), 0)), ("getaddrinfo", ("example.com", 80))):
            with pytest.raises(OfflineError, match="lookup"):
                getattr(module, name)(*args)
    assert [host for what, host in spied if not offline.is_local_host(host)] == []
    # what never leaves the machine still works: loopback names, numeric answers
    assert socket.gethostbyname("localhost").startswith("127.")
    assert socket.getnameinfo((TEST_NET, 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV) == (TEST_NET, "80")
    assert socket.gethostbyname(TEST_NET) == TEST_NET


def test_the_raw_socket_type_is_guarded_too(spied, loopback_server):
    """Code that makes its sockets from _socket.socket (no socket.socket methods) is refused as well."""
    raw = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        with pytest.raises(OfflineError):
            raw.connect((TEST_NET, 80))
        with pytest.raises(OfflineError):
            raw.connect_ex((TEST_NET, 80))
    finally:
        raw.close()
    udp = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        with pytest.raises(OfflineError):
            udp.sendto(b"x", (TEST_NET, 53))
    finally:
        udp.close()
    assert [(what, a) for what, a in spied if not offline.is_local_host(a[0] if isinstance(a, tuple) else a)] == []
    local = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        local.settimeout(10)
        local.connect(loopback_server.server_address)
        local.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while block := local.recv(4096):   # the server closes after an HTTP/1.0 reply; headers and body may come apart
            reply += block
        assert reply.endswith(b"\r\n\r\nok")
    finally:
        local.close()
    with socket.socket() as sock:   # and socket.socket, made on top of the real raw type, keeps working
        sock.settimeout(10)
        sock.connect(loopback_server.server_address)


def test_loopback_keeps_working(spied, loopback_server):
    port = loopback_server.server_address[1]
    for host in ("127.0.0.1", "localhost"):
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().read() == b"ok"
        conn.close()
    assert ("connect", ("127.0.0.1", port)) in spied


def test_offline_keyword_and_environment_turn_the_guard_on(tmp_path):
    code = f"""
import socket
from polargrid_local import PolarGridSync, offline
assert not offline.offline_enabled()
{{}}
try:
    socket.create_connection(("{TEST_NET}", 80), timeout=1)
except offline.OfflineError as exc:
    print("refused", exc)
"""
    env = {k: v for k, v in os.environ.items() if k != offline.OFFLINE_ENV}
    env["POLARGRID_LOCAL_CACHE"] = str(tmp_path)
    by_keyword = code.replace("{}", "PolarGridSync(fake=True, offline=True)\nassert offline.offline_enabled()")
    # unshare -n: a network namespace holding only loopback, so nothing could leave even without the guard
    for script, extra in ((by_keyword, {}),
                          (code.replace("assert not offline.offline_enabled()", "").replace("{}", "PolarGridSync(fake=True)"),
                           {offline.OFFLINE_ENV: "1"})):
        done = subprocess.run(["unshare", "-n", sys.executable, "-c", script], capture_output=True, text=True,
                              env={**env, **extra}, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "refused" in done.stdout and TEST_NET in done.stdout


def test_this_suite_runs_with_the_guard_on():
    """tests/conftest.py turns the guard on for the session: the suite proves nothing touches the network."""
    assert offline.offline_enabled()
    assert socket.create_connection is offline._guarded_create_connection
    assert socket.socket.connect is offline._guarded_connect
