"""Backend factories: registry entry + engine settings -> a loaded engine, one per model kind."""
from __future__ import annotations

from typing import Any

from ..host.gpu import NvmlProbe, cuda_build
from ..host.llama_safety import ensure_safe_llama
from ..store.registry import ModelSpec

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
    """Continuous batching (n_parallel sequences, max_queue waiting) unless n_parallel is 1."""
    from ..llm.backend import LlamaBackend
    from ..llm.batching import BatchedLlamaBackend

    ensure_safe_llama()
    settings = llama_settings(spec, overrides)
    n_parallel = int(overrides.get("n_parallel") or spec.engine.get("n_parallel", 8))
    if n_parallel <= 1:
        return LlamaBackend(path, **settings)
    max_queue = int(overrides.get("max_queue") or spec.engine.get("max_queue", 64))
    return BatchedLlamaBackend(path, n_parallel=n_parallel, max_queue=max_queue, **settings)


def embedding_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    """A pooled llama.cpp embedder; engine.tokenizer (a tokenizer.json beside the entry) replaces GGUF tokenization."""
    from pathlib import Path

    from ..llm.backend import LlamaBackend

    ensure_safe_llama()
    settings = llama_settings(spec, overrides)
    settings.pop("chat_template", None)
    tokenizer = spec.engine.get("tokenizer")
    return LlamaBackend(path, embedding=True, pooling=spec.engine.get("pooling", "mean"),
                        normalize=bool(spec.engine.get("normalize", True)),
                        tokenizer=Path(path).parent / tokenizer if tokenizer else None, **settings)


def rerank_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    """A cross-encoder GGUF scored by llama.cpp's rank pooling (llm/cross_encoder.py)."""
    from ..llm.cross_encoder import CrossEncoderBackend

    ensure_safe_llama()
    settings = llama_settings(spec, overrides)
    settings.pop("chat_template", None)
    return CrossEncoderBackend(path, **settings)


def stt_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    from ..llm.backend import available_cpus
    from ..speech.stt import WhisperBackend

    gpu = overrides.get("n_gpu_layers")
    gpu = spec.engine.get("n_gpu_layers", "auto") if gpu is None else gpu
    use_cuda = gpu not in (0, "0") and _ct2_cuda()
    return WhisperBackend(path, device="cuda" if use_cuda else "cpu",
                          compute_type=spec.engine.get("compute_type", "int8" if not use_cuda else "float16"),
                          cpu_threads=overrides.get("n_threads") or spec.engine.get("n_threads") or available_cpus(),
                          english_only=bool(spec.engine.get("english_only", False)))


def tts_factory(spec: ModelSpec, path: str, overrides: dict[str, Any]):
    from ..speech.tts import PiperBackend

    return PiperBackend(path, voices=spec.engine.get("voices"),
                        output_sample_rate=int(spec.engine.get("output_sample_rate", 24000)))


def _ct2_cuda() -> bool:
    try:
        import ctranslate2

        return ctranslate2.get_cuda_device_count() > 0
    except Exception:
        return False


def default_factories() -> dict[str, Any]:
    """The real engines available in this installation; "remote" builds every ``[models.remote]`` entry."""
    from ..remote import remote_factory

    return {"chat": chat_factory, "embedding": embedding_factory, "stt": stt_factory, "tts": tts_factory,
            "rerank": rerank_factory, "remote": remote_factory}
