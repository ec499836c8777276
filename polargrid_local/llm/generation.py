"""What a generation takes and gives: sampling settings, the events a model's worker streams, stop sequences."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_SEED = 0xFFFFFFFF  # llama.cpp: pick a random seed


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 is greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    grammar: Any = None  # constraints.Grammar: its .gbnf is the llama.cpp grammar
    speculative: bool = True  # False: no drafts for this request (llm/drafting.py), one token per step


@dataclass(frozen=True)
class TextDelta:
    """A piece of generated text. The last one of a generation carries finish_reason and counts."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    drafted: int = 0   # speculative decoding: tokens drafted for this generation, and how many were kept
    accepted: int = 0


@dataclass(frozen=True)
class Started:
    """The prompt was accepted (it fits the context); generation of choice ``index`` begins. ``cached_tokens``
    of the prompt were not processed: their cells came from ``cache`` ("memory" or "disk")."""

    prompt_tokens: int
    index: int = 0
    cached_tokens: int = 0
    cache: str | None = None


class StopMatcher:
    """Holds back text that might be the start of a stop sequence."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.hit = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if not self.stops:
            return piece, False
        self.buffer += piece
        positions = [(self.buffer.find(s), s) for s in self.stops]
        found = [(i, s) for i, s in positions if i >= 0]
        if found:
            index = min(i for i, _ in found)
            visible, self.buffer, self.hit = self.buffer[:index], "", True
            return visible, True
        keep = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(stop[:n]):
                    keep = max(keep, n)
                    break
        visible = self.buffer[: len(self.buffer) - keep]
        self.buffer = self.buffer[len(visible):]
        return visible, False

    def flush(self, tail: str) -> str:
        out, self.buffer = self.buffer + tail, ""
        return out
