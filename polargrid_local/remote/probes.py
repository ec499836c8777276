"""Whether each remote model's server answers, for status and health: answered at once from what the last probe
found, while probes run in the background, one at a time per server.

/health is open without a key, so it must never wait on a remote: a remote that drips its answer would hold
every caller (and a SIGTERM drain) for as long as it liked. A probe is bounded in time (PROBE_TIMEOUT in
all) and reads no body; concurrent callers share the probe in flight instead of starting their own.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from ..host import offline as offline_guard
from ..store.registry import ModelSpec
from .backend import RemoteBackend, is_loopback

PROBE_TTL = 5.0   # seconds a reachability answer is reused before the next call starts a new probe
UNKNOWN = "unknown"   # the answer until the first probe of a server has ended

logger = logging.getLogger("polargrid_local")


class Reachability:
    """'up', 'down', 'offline' or 'unknown' per remote server, never waiting for a probe.

    A call finds the last probe's answer; when that is older than PROBE_TTL (or there is none) it starts a
    probe on a daemon thread unless one is already running for that server, and returns what it has.
    ``probe(spec)`` makes the answer (``RemoteBackend.probe`` unless injected).
    """

    def __init__(self, probe: Callable[[ModelSpec], str] | None = None) -> None:
        self._probe = probe or _probe_once
        self._answers: dict[str, tuple[float, str]] = {}
        self._running: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False

    def __call__(self, spec: ModelSpec) -> str:
        key = self._key(spec)
        if offline_guard.offline_enabled() and not is_loopback(urlsplit(key).hostname):
            return "offline"   # known without asking anyone
        with self._lock:
            answer = self._answers.get(key)
            fresh = answer is not None and time.monotonic() - answer[0] < PROBE_TTL
            if not fresh and key not in self._running and not self._closed:
                self._running.add(key)
                threading.Thread(target=self._run, args=(key, spec), name="polargrid-probe", daemon=True).start()
        return answer[1] if answer is not None else UNKNOWN

    def close(self) -> None:
        """Start no more probes (those running end by themselves, within PROBE_TIMEOUT)."""
        with self._lock:
            self._closed = True

    @staticmethod
    def _key(spec: ModelSpec) -> str:
        assert spec.remote is not None, f"{spec.id} is not a remote model"
        return spec.remote.base_url

    def _run(self, key: str, spec: ModelSpec) -> None:
        try:
            state = self._probe(spec)
        except Exception:   # a probe that fails is a remote that is down, never a failed health answer
            logger.info("probing remote %s failed", spec.id, exc_info=True)
            state = "down"
        with self._lock:
            self._answers[key] = (time.monotonic(), state)
            self._running.discard(key)


def _probe_once(spec: ModelSpec) -> str:
    backend = RemoteBackend(spec)
    try:
        return backend.probe()
    finally:
        backend.close()
