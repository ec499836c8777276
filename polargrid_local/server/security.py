"""API keys (compared in constant time, never logged), a per-key requests-per-minute limit, limits on failed
key checks per client address and for the whole server, and open connections per client address.

A client address is counted by its group (``address_group``): an IPv4 address alone, an IPv6 address by its
/64 prefix (one host can hold a whole /64). The tables of addresses are bounded (TRACKED_ADDRESSES) and
pruned in O(1) amortised time: entries are kept in the order they were last touched, so the expired ones
are always at the front.
"""
from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

TRACKED_ADDRESSES = 65536   # entries per table; past it the least recently seen address is forgotten
WINDOW_S = 60.0


def address_group(host: str) -> str:
    """What limits count as one client: an IPv4 address, or an IPv6 address's /64 network."""
    try:
        address = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return str(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    return str(address)


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

    def __init__(self, per_minute: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._windows: OrderedDict[str, tuple[int, int]] = OrderedDict()   # least recently counted first
        self._lock = threading.Lock()

    def check(self, caller: str) -> int | None:
        """None if the request may go ahead, else the seconds until the caller's window resets."""
        if not self.per_minute:
            return None
        now = self.clock()
        window = int(now // WINDOW_S)
        with self._lock:
            while self._windows and next(iter(self._windows.values()))[0] != window:
                self._windows.popitem(last=False)   # only older windows sit before the current one
            current, count = self._windows.get(caller, (window, 0))
            if current != window:
                count = 0
            if count >= self.per_minute:
                return max(1, math.ceil((window + 1) * WINDOW_S - now))
            self._windows[caller] = (window, count + 1)
            self._windows.move_to_end(caller)
            if len(self._windows) > TRACKED_ADDRESSES:
                self._windows.popitem(last=False)
        return None

    def tracked(self) -> list[str]:
        """The callers counted in the current window."""
        with self._lock:
            return list(self._windows)


class AuthFailures:
    """Failed API-key checks over the last minute, per client address and for the whole server. Past either
    limit a client gets 429 before its key is even compared, so keys cannot be guessed at full speed, not
    even from many addresses."""

    def __init__(self, per_minute: int | None, global_per_minute: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.global_per_minute = global_per_minute
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()   # least recently failed first
        self._all: deque[float] = deque(maxlen=global_per_minute or 1)
        self._lock = threading.Lock()

    def check(self, address: str) -> tuple[int, str] | None:
        """None if ``address`` may try a key now, else (seconds until it may, "server" or "address": which
        limit is spent)."""
        now = self.clock()
        with self._lock:
            self._prune(now)
            if self.global_per_minute and len(self._all) >= self.global_per_minute:
                return max(1, math.ceil(WINDOW_S - (now - self._all[0]))), "server"
            times = self._failures.get(address)
            if not self.per_minute or times is None or len(times) < self.per_minute:
                return None
            return max(1, math.ceil(WINDOW_S - (now - times[0]))), "address"

    def retry_after(self, address: str) -> int | None:
        """None if ``address`` may try a key now, else the seconds until it may."""
        refused = self.check(address)
        return None if refused is None else refused[0]

    def failed(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            if self.global_per_minute:
                self._all.append(now)
            if not self.per_minute:
                return
            times = self._failures.get(address)
            if times is None:
                times = self._failures[address] = deque(maxlen=self.per_minute)
            times.append(now)
            self._failures.move_to_end(address)
            self._prune(now)
            if len(self._failures) > TRACKED_ADDRESSES:
                self._failures.popitem(last=False)

    def tracked(self) -> list[str]:
        """The addresses with failures in the last minute."""
        with self._lock:
            self._prune(self.clock())
            return list(self._failures)

    def _prune(self, now: float) -> None:
        while self._all and now - self._all[0] >= WINDOW_S:
            self._all.popleft()
        while self._failures and now - next(iter(self._failures.values()))[-1] >= WINDOW_S:
            self._failures.popitem(last=False)   # its newest failure is a minute old: all of them are


class ConnectionsPerAddress:
    """Open connections per client address group; the caller holds its own lock around these."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}

    def admit(self, group: str) -> bool:
        count = self._open.get(group, 0)
        if self.limit and count >= self.limit:
            return False
        self._open[group] = count + 1
        return True

    def release(self, group: str) -> None:
        count = self._open.get(group, 0) - 1
        if count > 0:
            self._open[group] = count
        else:
            self._open.pop(group, None)

    def count(self, group: str) -> int:
        return self._open.get(group, 0)
