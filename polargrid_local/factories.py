"""Backend factories: registry entry + engine settings -> a loaded engine, one per model kind."""
from __future__ import annotations

from typing import Any

from .gpu import NvmlProbe, cuda_build
from .registry import ModelSpec

LLAMA_KEYS = ("n_ctx", "n_threads", "n_batch", "chat_template", "main_gpu", "tensor_split", "flash_attn")


def resolve_gpu_layers(value: Any, nvml: NvmlProbe | None = None) -> int:
    """'auto' (or None) means every layer when this is a CUDA build with a CUDA device, else none."""
    if value is None or value == "auto":
        return -1 if cuda_build() and (nvml or NvmlProbe()).device_count() > 0 else 0
    return int(value)


def llama_settings(spec: ModelSpec, overrides: dict[str, Any]) -> dict[str, Any]:
    settings = {k: v for k, v in spec.engine.items() if k in LLAMA_KEYS}
    settings.update({k: v for k, v in overrides.items() if k in LLAMA_KEYS and v is not None})
    gpu_layers = overrides.get("n_gpu_layers")
    settings["n_gpu_layers"] = resolve_gpu_layers(gpu_layers if gpu_layers is not None else spec.engine.get("n_gpu_layers"))
    return settings


def chat_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    from .llm.backend import LlamaBackend

    return LlamaBackend(path, **llama_settings(spec, overrides))


def embedding_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    from .llm.backend import LlamaBackend

    settings = llama_settings(spec, overrides)
    settings.pop("chat_template", None)
    return LlamaBackend(path, embedding=True, pooling=spec.engine.get("pooling", "mean"),
                        normalize=bool(spec.engine.get("normalize", True)), **settings)


def default_factories() -> dict[str, Any]:
    """The real engines available in this installation."""
    return {"chat": chat_factory, "embedding": embedding_factory}
