"""API keys (compared in constant time, never logged), a per-key requests-per-minute limit, and a limit
on failed key checks per client address."""
from __future__ import annotations

import hmac
import math
import threading
import time


class KeyCheck:
    """No keys configured: everything is open. Otherwise a request needs one of them as a Bearer token."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The matching key's label (never the key itself), or None if none matches."""
        token = b""
        if authorization and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip().encode()
        found = None
        for index, key in enumerate(self._keys):  # every key is compared, so timing tells nothing
            if hmac.compare_digest(token, key) and found is None:
                found = f"key#{index}"
        return found


class RateLimiter:
    """Fixed one-minute windows per caller, as PolarGrid's edge counts them."""

    def __init__(self, per_minute: int | None, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._windows: dict[str, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def check(self, caller: str) -> int | None:
        """None if the request may go ahead, else the seconds until the caller's window resets."""
        if not self.per_minute:
            return None
        now = self.clock()
        window = int(now // 60)
        with self._lock:
            current, count = self._windows.get(caller, (window, 0))
            if current != window:
                count = 0
            if count >= self.per_minute:
                return max(1, math.ceil((window + 1) * 60 - now))
            self._windows[caller] = (window, count + 1)
            if len(self._windows) > 10000:
                self._windows = {k: v for k, v in self._windows.items() if v[0] == window}
        return None


class AuthFailures:
    """Failed API-key checks per client address over the last minute. Past the limit, a client gets 429
    before its key is even compared, so keys cannot be guessed at full speed."""

    def __init__(self, per_minute: int | None, clock=time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, address: str) -> int | None:
        """None if ``address`` may try a key now, else the seconds until it may."""
        if not self.per_minute:
            return None
        now = self.clock()
        with self._lock:
            recent = [t for t in self._failures.get(address, ()) if now - t < 60]
            if recent:
                self._failures[address] = recent
            else:
                self._failures.pop(address, None)
            if len(recent) < self.per_minute:
                return None
            return max(1, math.ceil(60 - (now - recent[-self.per_minute])))

    def failed(self, address: str) -> None:
        if not self.per_minute:
            return
        now = self.clock()
        with self._lock:
            times = self._failures.setdefault(address, [])
            times.append(now)
            del times[:-self.per_minute]
            if len(self._failures) > 10000:
                self._failures = {a: t for a, t in self._failures.items() if now - t[-1] < 60}
