"""Which model answers a request: the one asked for, else the first of its ``fallback`` list that can.

A model hands a request on when it cannot take it at all (its queue is full, its load is refused
for memory, it is not pulled, or, for a remote model, the server is unreachable, overloaded or
forbidden by the offline guard). Failures after a stream has begun are the caller's to see.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from polargrid import errors as sdk

from ..store.registry import ModelSpec, Registry

logger = logging.getLogger("polargrid_local")

T = TypeVar("T")
UNAVAILABLE = (502, 503, 504, 507)


def hands_on(exc: sdk.PolarGridError, spec: ModelSpec) -> bool:
    """True when ``exc`` means this model could not take the request, so a fallback may."""
    if isinstance(exc, sdk.RateLimitError):
        return True
    if isinstance(exc, sdk.ServerError):
        return exc.status_code in UNAVAILABLE
    if isinstance(exc, sdk.NotFoundError):
        return spec.remote is None  # the model was resolved, so locally this means "not pulled"
    return isinstance(exc, sdk.TimeoutError) and spec.remote is not None


class Router:
    """Runs a request on a model, then on each model of its ``fallback`` list while they hand it on."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def run(self, spec: ModelSpec, attempt: Callable[[ModelSpec], T]) -> T:
        """``attempt(spec)``, then ``attempt(fallback)`` for each fallback while they hand on."""
        first: sdk.PolarGridError | None = None
        notes: list[str] = []
        for name in (spec.id, *spec.fallback):
            candidate = self.registry.get(name)
            assert candidate is not None, f"fallback {name!r} is not in the registry"  # the registry refuses those
            try:
                return attempt(candidate)
            except sdk.PolarGridError as exc:
                if not hands_on(exc, candidate):
                    if first is not None:
                        exc.message = f"{exc.message} (after {'; '.join(notes)})"
                    raise
                logger.info("%s could not take the request (%s); trying its fallbacks", candidate.id, exc)
                first = first or exc
                notes.append(f"{candidate.id}: {exc.message}")
        assert first is not None
        if len(notes) > 1:
            first.message = f"{first.message} (fallbacks failed too: {'; '.join(notes[1:])})"
        raise first
