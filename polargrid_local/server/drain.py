"""Serving in the foreground, and stopping gracefully on SIGTERM (or Ctrl-C).

On the signal the server drains: new requests get 503 with ``Connection: close``, idle connections are
closed, in-flight requests may finish for ``Limits.drain_timeout_s``; past it, their work is stopped, so a
stream ends with an error frame and a non-streaming request gets a 503. The process then exits: within
the drain timeout plus a few seconds for the last answers and for unloading the models.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from ..engine import LocalEngine
from .app import PolarGridHTTPServer, ServerConfig, make_server
from .watch import SHUTDOWN

logger = logging.getLogger("polargrid_local.server")

STOPPED_GRACE_S = 2.0   # after the drain timeout: time for stopped requests to send their error
CLOSE_GRACE_S = 3.0     # then: time for the engine to unload before the process exits anyway


def drain(server: PolarGridHTTPServer, timeout: float) -> bool:
    """Refuse new work and let in-flight requests end; True if they all ended within ``timeout``."""
    server.draining.set()
    server.watch.close_idle()
    deadline = time.monotonic() + timeout
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.in_flight:
        return True
    stopped = server.watch.stop_all(SHUTDOWN)
    logger.warning("drain: %d requests still running after %.1fs; %d stopped", server.in_flight, timeout, stopped)
    deadline = time.monotonic() + STOPPED_GRACE_S
    while server.in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    return False


def serve(engine: LocalEngine, config: ServerConfig | None = None, *,
          on_ready: Callable[[PolarGridHTTPServer], None] | None = None) -> int:
    """Serve until SIGTERM or SIGINT, then drain and close the engine. Call from the main thread."""
    server = make_server(engine, config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="polargrid-http",
                            daemon=True)
    loop.start()
    try:
        if on_ready is not None:
            on_ready(server)
        while not stop.wait(0.5):
            pass
        logger.info("stopping: draining requests for up to %.1fs", server.limits.drain_timeout_s)
        drain(server, server.limits.drain_timeout_s)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.shutdown()
        server.server_close()
        closer = threading.Thread(target=engine.close, name="polargrid-close", daemon=True)
        closer.start()
        closer.join(CLOSE_GRACE_S)
    return 0
