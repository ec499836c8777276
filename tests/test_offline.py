"""The offline guard: refusals happen before any connect or name lookup; loopback keeps working.

No test here sends a packet off this machine: the socket layer under the guard is replaced by a spy
that refuses (and records) anything but loopback, so even a broken guard cannot reach the network.
"""
from __future__ import annotations

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


@pytest.fixture
def spied():
    """The guard on top of spies: what reached connect/getaddrinfo below the guard."""
    was_on = offline._enabled
    offline.disable()
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    reached: list[tuple[str, object]] = []

    def connect(sock, address):
        reached.append(("connect", address))
        if not offline.is_local_host(address[0] if isinstance(address, tuple) else address):
            raise RuntimeError(f"the spy refuses {address!r}: the guard let it through")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        reached.append(("getaddrinfo", host))
        if not offline.is_local_host(host) and not host[:1].isdigit():
            raise RuntimeError(f"the spy refuses to resolve {host!r}: the guard let it through")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
    offline.enable()
    try:
        yield reached
    finally:
        offline.disable()
        socket.socket.connect, socket.getaddrinfo = real_connect, real_getaddrinfo
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
