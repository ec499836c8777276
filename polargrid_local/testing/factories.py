"""The factories seam for the fakes: one factory per model kind, each building a fake backend from the script."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..store.registry import ModelSpec
from .audio import FakeSttBackend, FakeTtsBackend
from .chat import DEFAULT_EMBEDDING_SIZE, FakeChatBackend, FakeEmbeddingBackend
from .script import FakeScript


def fake_factories(script: FakeScript, real: dict[str, Any] | None = None) -> dict[str, Callable[..., Any]]:
    """Factories for every kind, answering from ``script``; they need no model files (``needs_files``).

    ``real`` factories passed to the engine are ignored: a fake engine never loads a real model.
    """

    def chat(spec: ModelSpec, path: str, overrides: dict[str, Any]) -> FakeChatBackend:
        return FakeChatBackend(spec.id, script.chat, n_ctx=_setting("n_ctx", spec, overrides, 2048),
                               n_parallel=_setting("n_parallel", spec, overrides, 8),
                               max_queue=_setting("max_queue", spec, overrides, 64))

    def embedding(spec: ModelSpec, path: str, overrides: dict[str, Any]) -> FakeEmbeddingBackend:
        return FakeEmbeddingBackend(spec.id, script.embeddings, n_ctx=_setting("n_ctx", spec, overrides, 512),
                                    dimensions=int(spec.engine.get("dimensions", DEFAULT_EMBEDDING_SIZE)))

    def stt(spec: ModelSpec, path: str, overrides: dict[str, Any]) -> FakeSttBackend:
        return FakeSttBackend(spec.id, script.stt, english_only=bool(spec.engine.get("english_only", False)))

    def tts(spec: ModelSpec, path: str, overrides: dict[str, Any]) -> FakeTtsBackend:
        return FakeTtsBackend(spec.id, script.tts, voices=spec.engine.get("voices"),
                              output_sample_rate=int(spec.engine.get("output_sample_rate", 24000)))

    factories = {"chat": chat, "embedding": embedding, "stt": stt, "tts": tts}
    # A registry entry served by a remote server gets the fake of its kind: tests never leave the process.
    factories["remote"] = lambda spec, path, overrides: factories[spec.kind](spec, path, overrides)
    for factory in factories.values():
        factory.needs_files = False
    return factories


def _setting(key: str, spec: ModelSpec, overrides: dict[str, Any], default: int) -> int:
    value = overrides.get(key)
    return int(value if value else spec.engine.get(key) or default)
