"""Model management, GPU facts, health and status: the SDK's operator calls, answered from this process."""
from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from polargrid.types import (
    BackendInfo,
    BackendStatus,
    GPUInfo,
    GPUMemoryInfo,
    GPUMemoryResponse,
    GPUMemorySimple,
    GPUMemoryState,
    GPUProcess,
    GPUPurgeRequest,
    GPUPurgeResponse,
    GPUUtilization,
    HealthFeatures,
    LoadModelRequest,
    LoadModelResponse,
    RegionModelStatus,
    RegionStatus,
    SystemStatus,
    UnloadAllModelsResponse,
    UnloadModelRequest,
    UnloadModelResponse,
)

from ._version import __version__
from .errors import NotFoundError, coerce, engine_boundary, invalid
from .host.gpu import MB, NvmlProbe
from .runtime.pool import ModelPool, UnloadReport
from .runtime.usage import UsageBook
from .store.registry import ModelSpec, Registry
from .types import (
    GPUStatusResponse,
    HealthResponse,
    ListModelsResponse,
    LoadedModel,
    ModelInfo,
    ModelMemory,
    ModelStatusResponse,
    RemoteInfo,
)

GB = 1024 ** 3
MODEL_TYPES = {"chat": "chat", "embedding": "embedding"}  # the SDK's Literal has no audio types


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Admin:
    """The SDK's operator calls (models, GPU, health, status), answered from the registry, the pool and NVML.

    ``reachability(spec)`` says whether a remote model's server answers; ``closed()`` whether the engine has
    shut down; ``runtime()`` names what runs the models (for health)."""

    def __init__(self, registry: Registry, pool: ModelPool, usage: UsageBook, nvml: NvmlProbe,
                 reachability: Callable[[ModelSpec], str], closed: Callable[[], bool],
                 runtime: Callable[[], str], prompt_cache: Callable[[], Any] | None = None) -> None:
        """``prompt_cache()``: the prompt cache's status for the model status (None: off)."""
        self.registry, self.pool, self.usage, self.nvml = registry, pool, usage, nvml
        self.reachability, self.closed, self.runtime = reachability, closed, runtime
        self.prompt_cache = prompt_cache

    def _remotes(self) -> dict[str, str]:
        """Each remote model's reachability (a cached probe; a remote that is down never fails the caller)."""
        return {m.id: self.reachability(m) for m in self.registry.models if m.remote is not None}

    def _info(self, spec: ModelSpec, name: str | None = None) -> ModelInfo:
        remote = None
        if spec.remote is not None:
            remote = RemoteInfo(base_url=spec.remote.base_url, model=spec.remote.model,
                                status=self.reachability(spec))
        return ModelInfo(id=name or spec.id, created=spec.created, owned_by=spec.owned_by, root=spec.id,
                         parent=spec.id if name and name != spec.id else None, pg_model_type=MODEL_TYPES.get(spec.kind),
                         pg_parameters=spec.parameters, pg_remote=remote,
                         pg_regions=[f"remote:{urlsplit(remote.base_url).netloc}" if remote else "local"],
                         pg_avg_latency_ms=self.usage.average_latency_ms(spec.id) or None,
                         pg_max_tokens=spec.engine.get("n_ctx") if spec.kind in MODEL_TYPES else None)

    def list_models(self) -> ListModelsResponse:
        """Every registry model, then each alias as its own entry (parent = the model), as OpenAI clients expect."""
        data = [self._info(spec) for spec in self.registry.models]
        data += [self._info(spec, alias) for spec in self.registry.models for alias in spec.aliases]
        return ListModelsResponse(data=data)

    def get_model(self, model_id: str) -> ModelInfo:
        if not model_id:
            raise invalid("Model ID is required")
        spec = self.registry.get(model_id)
        if spec is None:
            raise NotFoundError(f"Model {model_id!r} does not exist")
        return self._info(spec, model_id if model_id != spec.id else None)

    def _spec(self, name: str) -> ModelSpec:
        if not name:
            raise invalid("Model name is required")
        spec = self.registry.get(name)
        if spec is None:
            known = ", ".join(m.id for m in self.registry.models)
            raise NotFoundError(f"Model {name!r} does not exist. Known models: {known}")
        return spec

    def load_model(self, request: LoadModelRequest | dict[str, Any]) -> LoadModelResponse:
        request = coerce(LoadModelRequest, request, "load model request")
        spec = self._spec(request.model_name)
        if request.force_reload:
            self.pool.unload(spec, "was reloaded (force_reload)")
        already = self.pool.state(spec) == "loaded"
        with engine_boundary("model load"):
            _, seconds = self.pool.worker(spec)
        message = f"{spec.id} is already loaded" if already and not seconds else f"loaded {spec.id} in {seconds:.2f}s"
        return LoadModelResponse(status="success", model=spec.id, force_reload=request.force_reload, message=message)

    def unload_model(self, request: UnloadModelRequest | dict[str, Any]) -> UnloadModelResponse:
        request = coerce(UnloadModelRequest, request, "unload model request")
        spec = self._spec(request.model_name)
        report = self.pool.unload(spec)
        if report is None:
            return UnloadModelResponse(status="success", model=spec.id, message=f"{spec.id} was not loaded")
        return UnloadModelResponse(status="success", model=spec.id, message=f"unloaded {spec.id}; {_freed(report)}")

    def unload_all_models(self) -> UnloadAllModelsResponse:
        reports = self.pool.unload_all()
        return UnloadAllModelsResponse(status="success", unloaded_models=[r.model for r in reports], errors=[],
                                       total_unloaded=len(reports))

    def get_model_status(self) -> ModelStatusResponse:
        pool = self.pool
        loaded = pool.loaded()
        models = []
        for model_id in loaded:
            spec, facts, est = self.registry.get(model_id), pool.usage_of(model_id), pool.estimates.get(model_id)
            models.append(LoadedModel(
                model=model_id, kind=spec.kind if spec else "?", memory_mb=est.total // MB if est else 0,
                last_used=datetime.fromtimestamp(facts["last_used"], timezone.utc).isoformat(),
                keep_alive_s=facts["keep_alive"], expires_in_s=facts["expires_in"], in_flight=facts["in_flight"],
                speculative=facts["speculative"]))
        return ModelStatusResponse(loaded=loaded, loading_status={m.id: pool.state(m) for m in self.registry.models},
                                   repository=str(self.registry.cache_dir),
                                   models=models, remote=self._remotes(),
                                   prompt_cache=self.prompt_cache() if self.prompt_cache is not None else None)

    def get_gpu_status(self) -> GPUStatusResponse:
        devices = self.nvml.devices()
        gpus = [GPUInfo(index=d.index, name=d.name, temperature_c=d.temperature_c,
                        memory=GPUMemoryInfo(total_mb=d.total_bytes // MB, used_mb=d.used_bytes // MB,
                                             free_mb=d.free_bytes // MB, total_gb=round(d.total_bytes / GB, 2),
                                             used_gb=round(d.used_bytes / GB, 2), free_gb=round(d.free_bytes / GB, 2),
                                             percent_used=_pct(d.used_bytes, d.total_bytes)),
                        utilization=GPUUtilization(gpu_percent=d.gpu_percent, memory_percent=d.memory_percent))
                for d in devices]
        processes = [GPUProcess(pid=p.pid, name=p.name, memory_mb=p.used_bytes // MB) for p in self.nvml.processes()]
        pool = self.pool
        models = [ModelMemory(model=m, estimated_mb=est.total // MB, estimated_gpu_mb=est.gpu_bytes // MB,
                              measured_gpu_mb=pool.gpu_measured.get(m, 0) // MB)
                  for m in pool.loaded() if (est := pool.estimates.get(m)) is not None]
        return GPUStatusResponse(status="success", timestamp=_now(), gpus=gpus, processes=processes,
                                 total_gpus=len(gpus), models=models)

    def get_gpu_memory(self) -> GPUMemoryResponse:
        memory = [GPUMemorySimple(total_gb=round(d.total_bytes / GB, 2), used_gb=round(d.used_bytes / GB, 2),
                                  free_gb=round(d.free_bytes / GB, 2), percent_used=_pct(d.used_bytes, d.total_bytes),
                                  percent_free=_pct(d.free_bytes, d.total_bytes)) for d in self.nvml.devices()]
        return GPUMemoryResponse(status="success", timestamp=_now(), memory=memory)

    def _memory_state(self) -> GPUMemoryState:
        devices = self.nvml.devices()
        used, total = sum(d.used_bytes for d in devices), sum(d.total_bytes for d in devices)
        return GPUMemoryState(used_gb=round(used / GB, 3), total_gb=round(total / GB, 3),
                              percent_used=_pct(used, total))

    def purge_gpu(self, request: GPUPurgeRequest | dict[str, Any] | None) -> GPUPurgeResponse:
        """Unload models to free memory. Without force, models serving a request are left alone and reported."""
        purge: GPUPurgeRequest = GPUPurgeRequest() if request is None else coerce(GPUPurgeRequest, request,
                                                                                  "purge request")
        before = self._memory_state()
        actions, unloaded, errors = [], [], []
        freed_ram = 0
        for model_id in self.pool.loaded():
            spec = self.registry.get(model_id)
            if spec is None:
                continue
            if not purge.force and self.pool.queue_depth(spec) > 0:
                errors.append(f"{model_id} is serving a request; pass force=True to unload it anyway")
                continue
            report = self.pool.unload(spec, "was unloaded by a GPU purge")
            if report is not None:
                unloaded.append(model_id)
                freed_ram += report.freed_ram_bytes
                actions.append(f"unloaded {model_id} ({_freed(report)})")
        if not self.pool.loaded() and not errors and not unloaded:
            actions.append("no models were loaded")
        after = self._memory_state()
        freed = round(max(0.0, before.used_gb - after.used_gb), 3)
        if self.nvml.device_count() == 0:
            recommendation = "No GPU on this machine: models ran on the CPU; their RAM was released."
        elif errors:
            recommendation = "Some models were busy; retry with force=True or when requests finish."
        else:
            recommendation = "GPU memory released; models load again on their next request."
        return GPUPurgeResponse(status="partial" if errors else "success", timestamp=_now(), actions=actions,
                                memory_before=before, memory_after=after, memory_freed_gb=freed,
                                models_unloaded=unloaded, errors=errors, recommendation=recommendation)

    def health(self) -> HealthResponse:
        healthy = not self.closed()
        extensions = sorted({m.kind for m in self.registry.models if m.kind in self.pool.factories})
        return HealthResponse(
            status="healthy" if healthy else "unhealthy", node=socket.gethostname(),
            runtime=self.runtime(),
            timestamp=_now(), features=HealthFeatures(dynamic_loading=True, huggingface_support=True),
            backend=BackendStatus(healthy=healthy, info=BackendInfo(name="polargrid-local", version=__version__,
                                                                    extensions=extensions)),
            remotes=self._remotes())

    def get_status(self) -> SystemStatus:
        models = []
        for spec in self.registry.models:
            state = self.pool.state(spec)
            if state == "loaded":
                status, instances = "available", 1
            elif state == "loading":
                status, instances = "loading", 0
            elif spec.remote is not None:
                status, instances = ("available" if self.reachability(spec) == "up" else "unavailable"), 0
            else:
                loadable = self.pool.loadable(spec)
                status, instances = ("available" if loadable else "unavailable"), 0
            models.append(RegionModelStatus(model_id=spec.id, status=status, instances=instances,
                                            avg_latency_ms=self.usage.average_latency_ms(spec.id),
                                            queue_depth=self.pool.queue_depth(spec)))
        return SystemStatus(status="healthy" if not self.closed() else "unavailable",
                            regions=[RegionStatus(region="local", status="healthy", models=models)])


def _freed(report: UnloadReport) -> str:
    if not report.freed:
        return ("its requests were ended; its thread is finishing its current step and frees the memory when "
                "that step ends")
    parts = [f"{report.freed_ram_bytes / MB:.1f} MB of RAM"]
    if report.freed_gpu_bytes:
        parts.append(f"{report.freed_gpu_bytes / MB:.1f} MB of GPU memory")
    return "freed " + " and ".join(parts)


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 1) if whole else 0.0
