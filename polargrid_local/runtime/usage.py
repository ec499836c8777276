"""Per-model request and token counts for get_usage(), kept in memory for the life of the engine."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import datetime, timezone

from polargrid.types import ModelUsage, RegionUsage, UsagePeriod, UsageResponse, UsageStats

from ..errors import invalid


@dataclass
class _Tally:
    requests: int = 0
    tokens: int = 0
    latency_ms: int = 0


class UsageBook:
    """Counts requests, tokens and latency per model; local inference costs nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tallies: dict[str, _Tally] = {}

    def record(self, model_id: str, tokens: int, latency_ms: int = 0) -> None:
        with self._lock:
            tally = self._tallies.setdefault(model_id, _Tally())
            tally.requests += 1
            tally.tokens += tokens
            tally.latency_ms += latency_ms

    def average_latency_ms(self, model_id: str) -> int:
        with self._lock:
            tally = self._tallies.get(model_id)
            return tally.latency_ms // tally.requests if tally and tally.requests else 0

    def report(self, started: datetime, start_date: str | None, end_date: str | None) -> UsageResponse:
        """Requests and tokens since ``started`` (the engine's start), for the SDK's get_usage."""
        for name, value in (("start_date", start_date), ("end_date", end_date)):
            if value:
                try:
                    datetime.fromisoformat(value)
                except ValueError:
                    raise invalid(f"{name} must be an ISO date like 2026-01-31, not {value!r}", field=name) from None
        with self._lock:
            tallies = {k: _Tally(v.requests, v.tokens, v.latency_ms) for k, v in self._tallies.items()}
        requests = sum(t.requests for t in tallies.values())
        latency = sum(t.latency_ms for t in tallies.values())
        return UsageResponse(
            period=UsagePeriod(start_date=start_date or started.date().isoformat(),
                               end_date=end_date or datetime.now(timezone.utc).date().isoformat()),
            usage=UsageStats(
                total_requests=requests, total_tokens=sum(t.tokens for t in tallies.values()), total_cost=0.0,
                by_model=[ModelUsage(model_id=k, requests=t.requests, tokens=t.tokens, cost=0.0)
                          for k, t in sorted(tallies.items())],
                by_region=[RegionUsage(region="local", requests=requests,
                                       avg_latency_ms=latency // requests if requests else 0)] if requests else []))
