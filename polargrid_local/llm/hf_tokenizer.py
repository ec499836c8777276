"""A Hugging Face ``tokenizer.json`` as llama-cpp-python's tokenizer.

llama.cpp's WordPiece differs from Hugging Face's at the edges (special-token text such as
"[SEP]" in the input, words over 100 characters), so a BERT embedder runs with the tokenizer
it was trained with: the same token ids as sentence-transformers, never truncated.
"""
from __future__ import annotations

from pathlib import Path

from llama_cpp.llama_tokenizer import BaseLlamaTokenizer


class HFTokenizer(BaseLlamaTokenizer):
    """Token ids from the ``tokenizers`` package; ``add_bos`` adds the model's special tokens ([CLS] ... [SEP])."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text.decode("utf-8", errors="replace"), add_special_tokens=add_bos).ids

    def detokenize(self, tokens: list[int], prev_tokens: list[int] | None = None, special: bool = False) -> bytes:
        return self.tokenizer.decode(tokens, skip_special_tokens=not special).encode("utf-8")
