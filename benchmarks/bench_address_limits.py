"""Per-address limits at scale: the cost of one failed-key check and one rate-limit check with many addresses
tracked, as a ratio against the same calls with few tracked (issue 22 item 11: past 10,000 tracked addresses
the old tables rescanned themselves on every call).

    python benchmarks/bench_address_limits.py [--quick]

Prints JSON: per table, microseconds per call with ``--small`` and with ``--large`` addresses tracked (all within
the current minute, the worst case for pruning), and the ratio large/small (about 1 means O(1) per call).
Full run: about 10 s; --quick: about 2 s.
"""
from __future__ import annotations

import argparse
import json
import time

from polargrid_local.server.security import AuthFailures, RateLimiter


def per_call_us(table, tracked: int, calls: int) -> float:
    """Fill ``table`` with ``tracked`` addresses, then time ``calls`` more calls from new addresses."""
    record = table.failed if isinstance(table, AuthFailures) else table.check
    for i in range(tracked):
        record(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    started = time.perf_counter()
    for i in range(calls):
        address = f"11.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
        if isinstance(table, AuthFailures):
            table.check(address)
        record(address)
    return 1e6 * (time.perf_counter() - started) / calls


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    calls = 2000 if opts.quick else opts.calls
    frozen = lambda: 30.0  # noqa: E731  (every entry in the current minute: nothing can be pruned)
    result = {}
    for name, make in (("auth_failures", lambda: AuthFailures(10, 10 ** 9, clock=frozen)),
                       ("rate_limiter", lambda: RateLimiter(10, clock=frozen))):
        small = min(per_call_us(make(), opts.small, calls) for _ in range(3))
        large = min(per_call_us(make(), opts.large, calls) for _ in range(3))
        result[name] = {"us_per_call_small": round(small, 2), "us_per_call_large": round(large, 2),
                        "tracked_small": opts.small, "tracked_large": opts.large,
                        "ratio_large_over_small": round(large / small, 2)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
