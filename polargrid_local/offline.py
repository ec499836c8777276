"""The offline guard: while it is on, opening a socket to anything but loopback raises OfflineError.

Turned on by ``offline=True`` on PolarGrid/PolarGridSync/LocalEngine or ``POLARGRID_LOCAL_OFFLINE=1``.
Remote model entries (the only code that opens non-loopback connections at run time) check
``offline_enabled()`` to fail fast or fall back to a local model.
"""
from __future__ import annotations

OFFLINE_ENV = "POLARGRID_LOCAL_OFFLINE"


class OfflineError(ConnectionError):
    """A connection outside loopback was attempted while the offline guard is on; names the call site."""

    offline = True


_enabled = False


def offline_enabled() -> bool:
    """True while the guard is on in this process."""
    return _enabled
