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


DEFAULT_LIMITS = Limits()
