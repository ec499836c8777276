"""Whether each remote model's server answers: probes for status and health, their answers reused briefly."""
from __future__ import annotations

import threading
import time

from ..store.registry import ModelSpec
from .backend import RemoteBackend

PROBE_TTL = 5.0  # seconds a reachability answer is reused


class Reachability:
    """'up', 'down' or 'offline' per remote server, from a probe at most PROBE_TTL seconds old."""

    def __init__(self) -> None:
        self._probes: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def __call__(self, spec: ModelSpec) -> str:
        assert spec.remote is not None, f"{spec.id} is not a remote model"
        key = spec.remote.base_url
        with self._lock:
            cached = self._probes.get(key)
        if cached is not None and time.monotonic() - cached[0] < PROBE_TTL:
            return cached[1]
        backend = RemoteBackend(spec)
        try:
            state = backend.probe()
        finally:
            backend.close()
        with self._lock:
            self._probes[key] = (time.monotonic(), state)
        return state
