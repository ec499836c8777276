"""Every bound the engine and the HTTP server enforce, in one place: defaults, and how to change them.

``LocalEngine(limits=Limits(...))`` sets them for a process (the server reads the engine's); each field's
comment says what it bounds. A request past a limit gets a ValidationError (400) or RateLimitError (429)
that names the limit, never a crash or a silent truncation.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """The bounds one LocalEngine (and the server in front of it) enforces."""

    # -- requests (engine) ----------------------------------------------------------------

    # -- JSON schemas (response_format, tools) ---------------------------------------------

    # -- audio -----------------------------------------------------------------------------

    # -- HTTP ------------------------------------------------------------------------------
    max_body_bytes: int = 64 * 1024 * 1024    # largest request body (413 past it, connection closed)
    max_json_depth: int = 64                  # deepest nesting of a JSON body (400 past it)
    header_timeout_s: float = 10.0            # request line and headers must arrive within this (408, closed)
    body_timeout_s: float = 60.0              # the whole declared body must arrive within this (408, closed)
    keep_alive_timeout_s: float = 15.0        # an idle connection is closed after this long without a request
    socket_timeout_s: float = 60.0            # any single read or write that stalls this long ends the connection
    max_connections: int = 64                 # open connections; past it a new one gets 503 and is closed
    auth_failures_per_minute: int = 10        # failed API-key checks per client address (429 past it)
    drain_timeout_s: float = 10.0             # on SIGTERM: how long in-flight requests may finish before exit


DEFAULT_LIMITS = Limits()
