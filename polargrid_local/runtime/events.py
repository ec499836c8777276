"""What the engine tells its listeners (the HTTP server's /metrics): each generation's tokens and first token.

Listeners are called on the thread that finishes the stream (the reader's), so they must be quick and must not
raise; a listener that fails is logged and dropped. A generation's usage also gives its drafted and accepted
tokens (speculative decoding, ``drafted``) and its prompt tokens the cache supplied (``prompt_cache``).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("polargrid_local")


@dataclass(frozen=True)
class Generation:
    """One finished text generation (chat or completion) on a local model."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float | None   # from the request's submission to its first text; None if it produced none


class EngineEvents:
    """A list of listeners, each ``listener(kind, payload)`` with kind "generation", "drafted" or "prompt_cache"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[Callable[[str, Any], None]] = []

    def subscribe(self, listener: Callable[[str, Any], None]) -> None:
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[str, Any], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    def emit(self, kind: str, payload: Any) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(kind, payload)
            except Exception:
                logger.exception("an engine event listener failed; it is removed")
                self.unsubscribe(listener)

    def generation(self, model: str, usage: Any, first_token_s: float | None) -> None:
        """A generation ended (its usage, from the chunker; None if it was stopped before it finished)."""
        prompt = getattr(usage, "prompt_tokens", 0) or 0
        completion = getattr(usage, "completion_tokens", 0) or 0
        self.emit("generation", Generation(model, prompt, completion, first_token_s))
        drafts = getattr(usage, "completion_tokens_details", None)
        if drafts is not None:
            accepted = drafts.accepted_prediction_tokens
            self.drafted(model, accepted + drafts.rejected_prediction_tokens, accepted)
        cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
        if cached is not None:
            self.prompt_cache(model, cached > 0, cached)

    def drafted(self, model: str, drafted: int, accepted: int) -> None:
        """Speculative decoding: tokens drafted for one generation and how many the model accepted."""
        self.emit("drafted", (model, drafted, accepted))

    def prompt_cache(self, model: str, hit: bool, tokens_reused: int) -> None:
        """Prompt cache: whether a prompt reused cached tokens (in memory or from disk), and how many."""
        self.emit("prompt_cache", (model, hit, tokens_reused))


class FirstToken:
    """Wraps a stream's convert function and notes when the first generated text passes through it."""

    def __init__(self, convert: Callable[[Any], list[Any]]) -> None:
        self.convert = convert
        self.started = time.perf_counter()
        self.first_at: float | None = None

    def __call__(self, event: Any) -> list[Any]:
        text = getattr(event, "text", None)
        if self.first_at is None and text:
            self.first_at = time.perf_counter()
        return self.convert(event)

    @property
    def seconds(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started
