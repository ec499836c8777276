"""Backend factories: registry entry + load settings -> a loaded engine, one per model kind.

A factory is ``factory(spec, path, settings)`` (``settings``: runtime/settings.py's LoadSettings, the same
ones memory admission estimated). A factory may carry ``needs_files = False`` (it loads nothing from the
cache: the test kit's fakes) and ``forwards = True`` (its backend forwards requests to a remote server).
"""
from __future__ import annotations

from typing import Any

from ..host.llama_safety import ensure_safe_llama
from ..store.registry import ModelSpec
from .settings import LoadSettings


def chat_factory(spec: ModelSpec, path: str, settings: LoadSettings):
    """Continuous batching (n_parallel sequences, max_queue waiting) unless n_parallel is 1."""
    from ..llm.backend import LlamaBackend
    from ..llm.batching import BatchedLlamaBackend
    from ..llm.drafting import check_mode

    check_mode(settings.speculative, f"model {spec.id!r}: [models.engine] speculative")   # before the weights load
    ensure_safe_llama()
    if settings.n_parallel <= 1:
        return LlamaBackend(path, **settings.llama())
    cache = settings.prompt_cache if spec.engine.get("prompt_cache", True) is not False else None
    sha256 = next((f.sha256 for f in spec.files if f.path == spec.entry), None)
    return BatchedLlamaBackend(path, n_parallel=settings.n_parallel, max_queue=settings.max_queue,
                               prompt_cache=cache, model_id=spec.id, model_sha256=sha256,
                               speculative=settings.speculative, **settings.llama())


def embedding_factory(spec: ModelSpec, path: str, settings: LoadSettings):
    """A pooled llama.cpp embedder; engine.tokenizer (a tokenizer.json beside the entry) replaces GGUF tokenization."""
    from pathlib import Path

    from ..llm.backend import LlamaBackend

    ensure_safe_llama()
    kwargs = settings.llama()
    kwargs.pop("chat_template", None)
    tokenizer = spec.engine.get("tokenizer")
    return LlamaBackend(path, embedding=True, pooling=spec.engine.get("pooling", "mean"),
                        normalize=bool(spec.engine.get("normalize", True)),
                        tokenizer=Path(path).parent / tokenizer if tokenizer else None, **kwargs)


def rerank_factory(spec: ModelSpec, path: str, settings: LoadSettings):
    """A cross-encoder GGUF scored by llama.cpp's rank pooling (llm/cross_encoder.py)."""
    from ..llm.cross_encoder import CrossEncoderBackend

    ensure_safe_llama()
    kwargs = settings.llama()
    kwargs.pop("chat_template", None)
    return CrossEncoderBackend(path, **kwargs)


def stt_factory(spec: ModelSpec, path: str, settings: LoadSettings):
    from ..llm.backend import available_cpus
    from ..speech.stt import WhisperBackend

    use_cuda = settings.wants_gpu and _ct2_cuda()
    return WhisperBackend(path, device="cuda" if use_cuda else "cpu",
                          compute_type=spec.engine.get("compute_type", "int8" if not use_cuda else "float16"),
                          cpu_threads=settings.n_threads or available_cpus(),
                          english_only=bool(spec.engine.get("english_only", False)))


def tts_factory(spec: ModelSpec, path: str, settings: LoadSettings):
    from ..speech.tts import PiperBackend

    return PiperBackend(path, voices=spec.engine.get("voices"),
                        output_sample_rate=int(spec.engine.get("output_sample_rate", 24000)))


def _ct2_cuda() -> bool:
    from ..host.openmp import import_ctranslate2

    try:
        return import_ctranslate2().get_cuda_device_count() > 0
    except Exception:
        return False


def default_factories() -> dict[str, Any]:
    """The real engines available in this installation; "remote" builds every ``[models.remote]`` entry."""
    from ..remote.backend import remote_factory

    return {"chat": chat_factory, "embedding": embedding_factory, "stt": stt_factory, "tts": tts_factory,
            "rerank": rerank_factory, "remote": remote_factory}


def llama_runtime() -> str:
    """The llama.cpp build serving chat and embeddings, for health ("llama-cpp-python-0.3.36 cpu"). It does not
    import llama.cpp to say so (that takes a quarter of a second with the GIL held): the build's backend is
    named once a model has loaded it."""
    import sys
    from importlib import metadata

    from ..host.gpu import cuda_build

    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:  # pragma: no cover - a broken install still answers health
        version = "missing"
    if "llama_cpp" not in sys.modules:
        return f"llama-cpp-python-{version}"
    return f"llama-cpp-python-{version}" + (" cuda" if cuda_build() else " cpu")


chat_factory.describe = llama_runtime  # type: ignore[attr-defined]
