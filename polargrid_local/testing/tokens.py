"""A deterministic fake tokenizer and chat template, so token counts, limits and stops behave as with a model.

A token is a word with its leading whitespace, one punctuation mark with its leading whitespace, trailing
whitespace, or a special marker (``<|im_start|>``, ``<|im_end|>``) when ``special`` is on. Ids are handed
out in order of first sight, so text -> tokens -> text is exact.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Sequence

BOS, EOS = 1, 2
_SPECIAL = re.compile(r"(<\|[a-z_]+\|>)")
_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+")
_TURN = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\n", re.S)


def pieces(text: str, special: bool = False) -> list[str]:
    """The text cut into token strings (joined, they give the text back)."""
    parts = _SPECIAL.split(text) if special else [text]
    out: list[str] = []
    for i, part in enumerate(parts):
        if special and i % 2 == 1:
            out.append(part)
        elif part:
            out.extend(_PIECE.findall(part))
    return out


class FakeTokenizer:
    """Text to ids and back; one per fake model, shared by its requests."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        self._texts: list[str] = ["<unk>", "<s>", "</s>"]
        self._lock = threading.Lock()

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        with self._lock:
            ids = [BOS] if add_bos else []
            for piece in pieces(text, special):
                token = self._ids.get(piece)
                if token is None:
                    token = self._ids[piece] = len(self._texts)
                    self._texts.append(piece)
                ids.append(token)
            return ids

    def text_of(self, token: int) -> str:
        """What one id stands for ("" for BOS and EOS)."""
        with self._lock:
            return "" if token in (BOS, EOS) else self._texts[token]

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._lock:
            return "".join(self._texts[t] for t in tokens if t not in (BOS, EOS))


def render_chat(messages: list[dict]) -> str:
    """ChatML, as SmolLM2's template writes it, with the assistant's turn opened."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def parse_chat(prompt: str) -> list[dict] | None:
    """The messages a fake-rendered chat prompt holds; None for a plain completion prompt."""
    if not prompt.startswith("<|im_start|>"):
        return None
    return [{"role": role, "content": content} for role, content in _TURN.findall(prompt)]
