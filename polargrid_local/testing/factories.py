"""The factories seam for the fakes: one factory per model kind, each building a fake backend from the script."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..runtime.settings import LoadSettings
from ..store.registry import ModelSpec
from .audio import FakeSttBackend, FakeTtsBackend
from .chat import DEFAULT_EMBEDDING_SIZE, FakeChatBackend, FakeEmbeddingBackend
from .script import FakeScript


def fake_factories(script: FakeScript, real: dict[str, Any] | None = None) -> dict[str, Callable[..., Any]]:
    """Factories for every kind, answering from ``script``; they need no model files (``needs_files``).

    ``real`` factories passed to the engine are ignored: a fake engine never loads a real model. Remote
    entries get the fake of their kind (their factory does not forward), so tests never leave the process.
    """

    def chat(spec: ModelSpec, path: str, settings: LoadSettings) -> FakeChatBackend:
        return FakeChatBackend(spec.id, script.chat, n_ctx=settings.n_ctx, n_parallel=settings.n_parallel,
                               max_queue=settings.max_queue, n_batch=settings.n_batch)

    def embedding(spec: ModelSpec, path: str, settings: LoadSettings) -> FakeEmbeddingBackend:
        return FakeEmbeddingBackend(spec.id, script.embeddings, n_ctx=settings.n_ctx,
                                    dimensions=int(spec.engine.get("dimensions", DEFAULT_EMBEDDING_SIZE)))

    def stt(spec: ModelSpec, path: str, settings: LoadSettings) -> FakeSttBackend:
        return FakeSttBackend(spec.id, script.stt, english_only=bool(spec.engine.get("english_only", False)))

    def tts(spec: ModelSpec, path: str, settings: LoadSettings) -> FakeTtsBackend:
        return FakeTtsBackend(spec.id, script.tts, voices=spec.engine.get("voices"),
                              output_sample_rate=int(spec.engine.get("output_sample_rate", 24000)))

    factories: dict[str, Callable[..., Any]] = {"chat": chat, "embedding": embedding, "stt": stt, "tts": tts}
    factories["remote"] = lambda spec, path, settings: factories[spec.kind](spec, path, settings)
    for factory in factories.values():
        factory.needs_files = False  # type: ignore[attr-defined]
    chat.describe = lambda: "polargrid_local-fake"  # type: ignore[attr-defined]
    return factories
