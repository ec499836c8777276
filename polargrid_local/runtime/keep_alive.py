"""Model lifecycle as in Ollama: keep_alive (how long an idle model stays loaded) and the reaper that unloads it.

keep_alive is seconds (a number) or a duration string ("30s", "5m", "1h30m", "250ms"); 0 unloads a model as
soon as its last request is done, and any negative value keeps it loaded for good. A value past
MAX_KEEP_ALIVE_S (ten years; a huge integer, "inf") is refused with a ValidationError (400 over HTTP) that
says to use -1. Where it comes from, first
match wins: the last request's ``keep_alive`` for that model, the model's ``[models.engine] keep_alive``, the
engine's ``keep_alive=`` keyword, ``[settings] keep_alive`` in models.toml; else models stay loaded (-1).

The pool records, per loaded model, its requests in flight and when its last one ended; the Reaper thread asks
the pool, a few times a second, to unload each model idle for longer than its keep_alive.
"""
from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

from ..errors import invalid

logger = logging.getLogger("polargrid_local")

FOREVER: float = math.inf
MAX_KEEP_ALIVE_S = 10 * 365 * 86400.0   # ten years: anything longer means "for good", which is -1
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_NOT_GIVEN = object()


def parse_keep_alive(value: Any, field: str = "keep_alive") -> float:
    """Seconds a model stays loaded when idle: 0 = unload when done, math.inf = forever (any negative value)."""
    if isinstance(value, bool) or value is None:
        raise invalid(f"{field} must be seconds or a duration like '5m'", field=field)
    if isinstance(value, int) and value < 0:
        return FOREVER  # before float(): a huge negative integer does not fit a float
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        sign = -1.0 if text.startswith("-") else 1.0
        text = text.lstrip("+-")
        try:
            seconds = sign * float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise invalid(f"{field} {value!r} is not seconds or a duration like '30s', '5m', '1h30m'",
                              field=field) from None
            seconds = sign * sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise invalid(f"{field} must be seconds or a duration like '5m'", field=field)
    if math.isnan(seconds):
        raise invalid(f"{field} must be a number", field=field)
    if seconds < 0:
        return FOREVER
    if seconds > MAX_KEEP_ALIVE_S:
        raise invalid(f"{field} may be at most {MAX_KEEP_ALIVE_S:.0f} s (ten years); use -1 to keep the model "
                      "loaded for good", field=field)
    return seconds


def split_keep_alive(request: Any) -> tuple[Any, float | None]:
    """A request dict without its ``keep_alive`` key, and that key parsed (None when absent)."""
    if not isinstance(request, dict) or "keep_alive" not in request:
        return request, None
    request = dict(request)
    return request, parse_keep_alive(request.pop("keep_alive"))


def describe(seconds: float | None) -> str:
    if seconds is None or seconds == FOREVER:
        return "forever"
    if seconds >= 60:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes}m{rest:02d}s" if rest else f"{minutes}m"
    return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"


class Reaper:
    """A daemon thread that unloads models idle past their keep_alive: ``reap()`` unloads them (and returns
    their ids), ``next_expiry_in()`` says how long until the next one is due.

    It sleeps until the soonest expiry (at most ``interval``), so an unload lands within milliseconds of it."""

    def __init__(self, reap: Callable[[], list[str]], next_expiry_in: Callable[[], float],
                 interval: float = 0.25) -> None:
        self.reap = reap
        self.next_expiry_in = next_expiry_in
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polargrid-reaper", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Check now (a request just finished; keep_alive 0 unloads at once)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:  # sleep to the next expiry (woken early when a request ends or sets keep_alive)
                pause = min(self.interval, max(0.001, self.next_expiry_in()))
            except Exception:
                pause = self.interval
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                for model_id in self.reap():
                    logger.info("unloaded %s: idle past its keep_alive", model_id)
            except Exception:  # the reaper must outlive any one failed unload
                logger.exception("keep_alive reaper failed")

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
