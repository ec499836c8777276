"""ModelPool: which models are loaded, loading them on first use, and unloading them for real."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import NotFoundError, ServerError, invalid
from ..host.gpu import MB, NvmlProbe, resident_bytes
from ..host.malloc import trim
from ..limits import DEFAULT_LIMITS, Limits
from ..store.pull import is_pulled
from ..store.registry import ModelSpec, Registry
from .keep_alive import FOREVER, Reaper, parse_keep_alive
from .memory import (
    POLICIES,
    Estimate,
    available_host_bytes,
    check_fits,
    estimate,
    estimate_files,
    gguf_facts,
    gpu_layers_that_fit,
)
from .settings import LoadSettings
from .worker import ModelWorker, unloaded_error

logger = logging.getLogger("polargrid_local")

LoadState = Literal["loaded", "loading", "unloaded", "failed"]
BackendFactory = Callable[[ModelSpec, str, LoadSettings], Any]


@dataclass
class UnloadReport:
    model: str
    freed_ram_bytes: int
    freed_gpu_bytes: int
    freed: bool = True   # False: the model's thread is finishing a step and frees the memory when it ends


class ModelPool:
    """Owns one ModelWorker per loaded model; backends come from injected factories, one per kind."""

    def __init__(self, registry: Registry, factories: dict[str, BackendFactory], *,
                 overrides: dict[str, Any] | None = None, nvml: NvmlProbe | None = None,
                 memory_policy: str = "refuse", memory_budget_mb: int | None = None, keep_alive: Any = None,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        if memory_policy not in POLICIES:
            raise ValueError(f"memory_policy must be one of {', '.join(POLICIES)}")
        self.registry = registry
        self.limits = limits
        self.factories = factories
        self.overrides = overrides or {}
        self.nvml = nvml or NvmlProbe()
        self.memory_policy = memory_policy
        self.memory_budget = memory_budget_mb * MB if memory_budget_mb else None
        self.estimates: dict[str, Estimate] = {}   # loaded models and loads admitted (reserved), by id
        self._admission = threading.Lock()         # one admission at a time: check and reserve together
        self.gpu_measured: dict[str, int] = {}
        self._workers: dict[str, ModelWorker[Any]] = {}
        self._states: dict[str, LoadState] = {}
        self._errors: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        # lifecycle (see lifecycle.py): requests in flight, when each model was last used, keep_alive per model
        self._in_flight: dict[str, int] = {}
        self._last_used: dict[str, tuple[float, float]] = {}  # model -> (monotonic, wall clock)
        self._keep_alive: dict[str, float] = {}               # set by the last request that named one
        self._ended: deque[tuple[ModelSpec, float, float]] = deque()  # requests done, not yet counted
        if keep_alive is None:
            keep_alive = registry.settings.get("keep_alive")
        self.default_keep_alive = FOREVER if keep_alive is None else parse_keep_alive(keep_alive)
        self.reaper = Reaper(self.reap_idle, self.next_expiry_in)

    def resolve(self, name: str | None, kind: str | tuple[str, ...]) -> ModelSpec:
        """The registry entry for a request's model name; NotFoundError names what exists."""
        kinds = (kind,) if isinstance(kind, str) else kind
        if not name:
            spec = self.registry.default(kinds[0])
            if spec is None:
                raise invalid("model is required")
            return spec
        spec = self.registry.get(name)
        if spec is None or spec.kind not in kinds:
            available = ", ".join(m.id for m in self.registry.of_kind(*kinds)) or "none"
            what = "/".join(kinds)
            raise NotFoundError(f"Model {name!r} is not a known {what} model. Available: {available}")
        return spec

    def forwards(self, spec: ModelSpec) -> bool:
        """True when a remote server answers the model's requests (its factory forwards them); False when a
        backend in this process does (a local engine, or a fake answering a remote entry offline)."""
        return spec.remote is not None and bool(getattr(self.factories.get("remote"), "forwards", False))

    def loadable(self, spec: ModelSpec) -> bool:
        """True when loading the model needs nothing more (its files are pulled, or its factory needs none)."""
        factory = self.factories.get("remote" if spec.remote is not None else spec.kind)
        return spec.remote is not None or not getattr(factory, "needs_files", True) or is_pulled(self.registry, spec)

    def state(self, spec: ModelSpec) -> LoadState:
        with self._lock:
            return self._states.get(spec.id, "unloaded")

    def loaded(self) -> list[str]:
        with self._lock:
            return [model_id for model_id, state in self._states.items() if state == "loaded"]

    def worker(self, spec: ModelSpec) -> tuple[ModelWorker[Any], float]:
        """The model's worker, loading the model if needed; also the seconds spent loading (0 if warm)."""
        with self._lock:
            worker = self._workers.get(spec.id)
            if worker is not None and worker.alive:
                return worker, 0.0
            lock = self._locks.setdefault(spec.id, threading.Lock())
        with lock:
            with self._lock:
                worker = self._workers.get(spec.id)
                if worker is not None and worker.alive:
                    return worker, 0.0
                self._workers.pop(spec.id, None)
                self._states[spec.id] = "loading"
            started = time.perf_counter()
            try:
                backend = self._create_backend(spec)
            except BaseException as exc:
                with self._lock:
                    self._states[spec.id] = "failed"
                    self._errors[spec.id] = str(exc)
                raise
            worker_type = getattr(backend, "worker_type", None)  # remote models bring their own
            worker = (worker_type or ModelWorker)(spec.id, backend, self.limits)
            with self._lock:
                self._last_used[spec.id] = (time.monotonic(), time.time())
                self._workers[spec.id] = worker
                self._states[spec.id] = "loaded"
                self._errors.pop(spec.id, None)
            seconds = time.perf_counter() - started
            logger.info("loaded %s in %.2fs", spec.id, seconds)
            return worker, seconds

    def _create_backend(self, spec: ModelSpec) -> Any:
        factory = self.factories.get(spec.kind)
        needs_files = getattr(factory, "needs_files", True)  # a fake engine's factory says False
        if needs_files and not is_pulled(self.registry, spec):
            raise NotFoundError(f"Model {spec.id!r} is registered but not downloaded. "
                                f"Run `polargrid-local pull {spec.id}` (cache: {self.registry.cache_dir}).")
        engine_kind = "remote" if spec.remote is not None else spec.kind
        factory = self.factories.get(engine_kind)
        if factory is None:
            raise ServerError(f"no engine for {engine_kind} models is available in this installation", 501)
        if spec.remote is not None:
            path = spec.remote.base_url
        else:
            path = str(spec.path_in(self.registry.cache_dir))
        settings = self.settings_for(spec)
        if needs_files and spec.remote is None:
            settings = self._admit_memory(spec, path, settings.resolved(self.nvml))
        gpu_before = self.nvml.used_by_this_process()
        try:
            backend = factory(spec, path, settings)
        except BaseException as exc:
            self.estimates.pop(spec.id, None)   # the load failed: give back what admission reserved
            if isinstance(exc, (NotFoundError, ServerError)) or not isinstance(exc, Exception):
                raise
            raise ServerError(f"loading {spec.id!r} failed: {type(exc).__name__}: {exc}", 500) from exc
        self.gpu_measured[spec.id] = max(0, self.nvml.used_by_this_process() - gpu_before)
        return backend

    def settings_for(self, spec: ModelSpec) -> LoadSettings:
        """What ``spec`` loads with: the engine's overrides over its [models.engine] over the defaults."""
        return LoadSettings.resolve(spec, self.overrides)

    def _estimate(self, spec: ModelSpec, path: str, settings: LoadSettings) -> Estimate:
        if spec.kind not in ("chat", "embedding"):
            return estimate_files(path, spec.kind)
        return estimate(path, n_ctx=settings.n_ctx, n_parallel=settings.n_parallel if spec.kind == "chat" else 1,
                        n_batch=settings.n_batch, n_gpu_layers=int(settings.n_gpu_layers),
                        embedding=spec.kind == "embedding")

    def _admit_memory(self, spec: ModelSpec, path: str, settings: LoadSettings) -> LoadSettings:
        """Refuse (or make room for) a load that would not fit, else reserve its estimate (``estimates``) until
        it is unloaded or its load fails; returns the settings to load with. Loads started at once are admitted
        one at a time, each counting what the others reserved."""
        with self._admission:
            return self._admit_locked(spec, path, settings)

    def _admit_locked(self, spec: ModelSpec, path: str, settings: LoadSettings) -> LoadSettings:
        try:
            est = self._estimate(spec, path, settings)
        except Exception as exc:  # an unreadable header fails the load itself, with its own message
            logger.debug("no memory estimate for %s: %s", spec.id, exc)
            return settings
        reason = self._does_not_fit(est, settings, spec.id)
        if reason and self.memory_policy == "evict":
            for victim in self.least_recently_used():  # idle models, the longest idle first
                victim_spec = self.registry.get(victim)
                if victim_spec is None or victim == spec.id or self.queue_depth(victim_spec):
                    continue
                logger.info("unloading idle %s to make room for %s", victim, spec.id)
                self.unload(victim_spec)
                reason = self._does_not_fit(est, settings, spec.id)
                if not reason:
                    break
        if reason and self.memory_policy == "offload-less" and est.gpu_fraction > 0:
            free_gpu = self._free_gpu(settings)
            n_layer = gguf_facts(path)["n_layer"]
            fit = gpu_layers_that_fit(est, free_gpu or 0, n_layer)
            logger.info("offloading %d of %d layers of %s to fit GPU memory", fit, n_layer, spec.id)
            settings = settings.replace(n_gpu_layers=fit)
            est = self._estimate(spec, path, settings)
            reason = self._does_not_fit(est, settings, spec.id)
        if reason:
            raise ServerError(f"Not loading {spec.id!r}: it {reason}. Unload a model, lower n_ctx or n_parallel, "
                              f"or set memory_policy='evict' or 'offload-less'.", 507)
        self.estimates[spec.id] = est
        return settings

    def _free_gpu(self, settings: LoadSettings) -> int | None:
        devices = self.nvml.devices()
        if not devices:
            return None
        return devices[min(settings.main_gpu, len(devices) - 1)].free_bytes

    def _does_not_fit(self, est: Estimate, settings: LoadSettings, model_id: str) -> str | None:
        """Why ``est`` does not fit beside every other reservation, or None. Models still loading have not
        taken their memory yet, so what they reserved comes off the free RAM and GPU memory measured now."""
        others = [(m, e) for m, e in list(self.estimates.items()) if m != model_id]
        with self._lock:
            loading = [e for m, e in others if self._states.get(m) == "loading"]
        budget = None
        if self.memory_budget is not None:
            budget = self.memory_budget - sum(e.total for _m, e in others)
        free_gpu = self._free_gpu(settings) if est.gpu_fraction > 0 else None
        if free_gpu is not None:
            free_gpu = max(0, free_gpu - sum(e.gpu_bytes for e in loading))
        free_host = available_host_bytes()
        if free_host:   # 0 means unknown; a known amount stays known
            free_host = max(1, free_host - sum(e.host_bytes for e in loading))
        return check_fits(est, free_gpu=free_gpu, free_host=free_host, budget=budget)

    def unload(self, spec: ModelSpec, why: str = "was unloaded") -> UnloadReport | None:
        """Stop the model's worker and free its backend; None if it was not loaded.

        Requests queued or running on it end at once with a 503 that says the model ``why``. The
        backend is freed by the worker's own thread once its running step ends (never while that
        thread may still use it); this waits up to ``limits.unload_wait_s`` for that, and the report
        says whether it happened.
        """
        with self._lock:
            worker = self._workers.pop(spec.id, None)
            self._states[spec.id] = "unloaded"
            self._forget_use(spec.id)
        return self._release(spec, worker, why)

    def _release(self, spec: ModelSpec, worker: ModelWorker[Any] | None, why: str = "was unloaded"
                 ) -> UnloadReport | None:
        self.estimates.pop(spec.id, None)
        self.gpu_measured.pop(spec.id, None)
        if worker is None:
            return None
        ram_before, gpu_before = resident_bytes(), self.nvml.used_by_this_process()
        worker.close(unloaded_error(spec.id, why))
        freed = worker.wait_freed(self.limits.unload_wait_s)
        if not freed:
            logger.warning("%s: its thread is finishing a step; its memory is freed when that step ends", spec.id)
        gc.collect()
        trim()   # what the model's allocations left in malloc's free lists goes back to the system
        return UnloadReport(spec.id, max(0, ram_before - resident_bytes()),
                            max(0, gpu_before - self.nvml.used_by_this_process()), freed)

    def unload_all(self, why: str = "was unloaded") -> list[UnloadReport]:
        with self._lock:
            ids = list(self._workers)
        reports = []
        for model_id in ids:
            spec = self.registry.get(model_id)
            if spec is not None:
                report = self.unload(spec, why)
                if report is not None:
                    reports.append(report)
        return reports

    def queue_depth(self, spec: ModelSpec) -> int:
        with self._lock:
            worker = self._workers.get(spec.id)
        return worker.queue_depth if worker else 0

    # -- lifecycle: see lifecycle.py ------------------------------------------------------

    def begin(self, spec: ModelSpec) -> None:
        """A request for the model starts; call end() when it is done."""
        with self._lock:
            self._in_flight[spec.id] = self._in_flight.get(spec.id, 0) + 1

    def set_keep_alive(self, spec: ModelSpec, seconds: float) -> None:
        """How long the model stays loaded once idle, until it is unloaded or another request sets it."""
        with self._lock:
            self._keep_alive[spec.id] = seconds
        self.reaper.wake()

    def end(self, spec: ModelSpec) -> None:
        """A request is done. Never blocks: it may run from a stream's __del__ (the garbage collector, on any
        thread, perhaps one holding the pool's lock); if the lock is busy, the reaper settles it."""
        self._ended.append((spec, time.monotonic(), time.time()))
        self._settle_ended(blocking=False)
        self.reaper.wake()

    def _settle_ended(self, blocking: bool) -> None:
        if not self._lock.acquire(blocking=blocking):
            return
        try:
            while self._ended:
                spec, mono, wall = self._ended.popleft()
                self._in_flight[spec.id] = max(0, self._in_flight.get(spec.id, 1) - 1)
                if spec.id in self._workers:
                    self._last_used[spec.id] = (mono, wall)
        finally:
            self._lock.release()

    def keep_alive_for(self, spec: ModelSpec) -> float:
        """Seconds the model stays loaded when idle (math.inf: forever)."""
        if spec.id in self._keep_alive:
            return self._keep_alive[spec.id]
        if "keep_alive" in spec.engine:
            return parse_keep_alive(spec.engine["keep_alive"], f"{spec.id}: keep_alive")
        return self.default_keep_alive

    def usage_of(self, model_id: str) -> dict[str, Any]:
        """Lifecycle facts of a loaded model: last use (wall clock), keep_alive, seconds left, requests in flight;
        and its speculative decoding counts (a chat backend's ``speculative_stats()``; None for others)."""
        spec = self.registry.get(model_id)
        with self._lock:
            mono, wall = self._last_used.get(model_id, (time.monotonic(), time.time()))
            in_flight = self._in_flight.get(model_id, 0)
            worker = self._workers.get(model_id)
        stats = getattr(getattr(worker, "backend", None), "speculative_stats", None)
        keep = self.keep_alive_for(spec) if spec is not None else FOREVER
        left = None if keep == FOREVER else (keep if in_flight else max(0.0, keep - (time.monotonic() - mono)))
        return {"last_used": wall, "keep_alive": None if keep == FOREVER else keep, "expires_in": left,
                "in_flight": in_flight, "speculative": stats() if stats is not None else None}

    def least_recently_used(self) -> list[str]:
        """Loaded models with nothing in flight, the longest idle first."""
        with self._lock:
            idle = [m for m, state in self._states.items() if state == "loaded" and not self._in_flight.get(m)]
            return sorted(idle, key=lambda m: self._last_used.get(m, (0.0, 0.0))[0])

    def next_expiry_in(self) -> float:
        """Seconds until the next idle model's keep_alive runs out (math.inf when none will)."""
        now, soonest = time.monotonic(), FOREVER
        for model_id in self.least_recently_used():
            spec = self.registry.get(model_id)
            keep = self.keep_alive_for(spec) if spec is not None else FOREVER
            if keep != FOREVER:
                soonest = min(soonest, keep - (now - self._last_used.get(model_id, (now, 0.0))[0]))
        return soonest

    def reap_idle(self) -> list[str]:
        """Unload every model idle past its keep_alive; the ids unloaded."""
        self._settle_ended(blocking=True)
        now = time.monotonic()
        reaped = []
        for model_id in self.least_recently_used():
            spec = self.registry.get(model_id)
            if spec is None:
                continue
            keep = self.keep_alive_for(spec)
            with self._lock:  # checked again under the lock: a request may have begun since
                idle_since = self._last_used.get(model_id, (now, 0.0))[0]
                if keep == FOREVER or self._in_flight.get(model_id) or now - idle_since < keep:
                    continue
                worker = self._workers.pop(model_id, None)
                if worker is None or worker.queue_depth:
                    if worker is not None:
                        self._workers[model_id] = worker
                    continue
                self._states[model_id] = "unloaded"
                self._forget_use(model_id)
            self._release(spec, worker, f"was unloaded after {keep:g} s idle (keep_alive)")
            reaped.append(model_id)
        return reaped

    def _forget_use(self, model_id: str) -> None:
        self._last_used.pop(model_id, None)
        self._keep_alive.pop(model_id, None)

    def close(self) -> None:
        self.reaper.close()
        self.unload_all("was unloaded because the engine is shutting down")
