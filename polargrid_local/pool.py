"""ModelPool: which models are loaded, loading them on first use, and unloading them for real."""
from __future__ import annotations

import gc
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

from .errors import NotFoundError, ServerError, invalid
from .gpu import NvmlProbe, resident_bytes
from .pull import is_pulled
from .registry import ModelSpec, Registry
from .worker import ModelWorker

logger = logging.getLogger("polargrid_local")

LoadState = Literal["loaded", "loading", "unloaded", "failed"]
BackendFactory = Callable[[ModelSpec, str, dict[str, Any]], Any]


@dataclass
class UnloadReport:
    model: str
    freed_ram_bytes: int
    freed_gpu_bytes: int


class ModelPool:
    """Owns one ModelWorker per loaded model; backends come from injected factories, one per kind."""

    def __init__(self, registry: Registry, factories: dict[str, BackendFactory], *, overrides: dict[str, Any] | None = None,
                 nvml: NvmlProbe | None = None) -> None:
        self.registry = registry
        self.factories = factories
        self.overrides = overrides or {}
        self.nvml = nvml or NvmlProbe()
        self._workers: dict[str, ModelWorker[Any]] = {}
        self._states: dict[str, LoadState] = {}
        self._errors: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

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
            if worker is not None:
                return worker, 0.0
            lock = self._locks.setdefault(spec.id, threading.Lock())
        with lock:
            with self._lock:
                worker = self._workers.get(spec.id)
                if worker is not None:
                    return worker, 0.0
                self._states[spec.id] = "loading"
            started = time.perf_counter()
            try:
                backend = self._create_backend(spec)
            except BaseException as exc:
                with self._lock:
                    self._states[spec.id] = "failed"
                    self._errors[spec.id] = str(exc)
                raise
            worker = ModelWorker(spec.id, backend)
            with self._lock:
                self._workers[spec.id] = worker
                self._states[spec.id] = "loaded"
                self._errors.pop(spec.id, None)
            seconds = time.perf_counter() - started
            logger.info("loaded %s in %.2fs", spec.id, seconds)
            return worker, seconds

    def _create_backend(self, spec: ModelSpec) -> Any:
        if not is_pulled(self.registry, spec):
            raise NotFoundError(f"Model {spec.id!r} is registered but not downloaded. "
                                f"Run `polargrid-local pull {spec.id}` (cache: {self.registry.cache_dir}).")
        factory = self.factories.get(spec.kind)
        if factory is None:
            raise ServerError(f"no engine for {spec.kind} models is available in this installation", 501)
        path = str(spec.path_in(self.registry.cache_dir))
        try:
            return factory(spec, path, self.overrides)
        except (NotFoundError, ServerError):
            raise
        except Exception as exc:
            raise ServerError(f"loading {spec.id!r} failed: {type(exc).__name__}: {exc}", 500) from exc

    def unload(self, spec: ModelSpec) -> UnloadReport | None:
        """Stop the model's worker and free its backend; None if it was not loaded."""
        with self._lock:
            worker = self._workers.pop(spec.id, None)
            self._states[spec.id] = "unloaded"
        if worker is None:
            return None
        ram_before, gpu_before = resident_bytes(), self.nvml.used_by_this_process()
        worker.close()
        backend, worker.backend = worker.backend, None
        close = getattr(backend, "close", None)
        if close is not None:
            close()
        del backend
        gc.collect()
        return UnloadReport(spec.id, max(0, ram_before - resident_bytes()),
                            max(0, gpu_before - self.nvml.used_by_this_process()))

    def unload_all(self) -> list[UnloadReport]:
        with self._lock:
            ids = list(self._workers)
        reports = []
        for model_id in ids:
            spec = self.registry.get(model_id)
            if spec is not None:
                report = self.unload(spec)
                if report is not None:
                    reports.append(report)
        return reports

    def queue_depth(self, spec: ModelSpec) -> int:
        with self._lock:
            worker = self._workers.get(spec.id)
        return worker.queue_depth if worker else 0

    def close(self) -> None:
        self.unload_all()
