"""A cross-encoder GGUF served through llama.cpp's rank pooling: one relevance score per (query, document) pair.

Registry entries of kind ``rerank`` load as this backend (a BERT cross-encoder such as ms-marco-MiniLM
converts with ``convert = "bert-rerank-gguf:hf"``; GGUFs made by llama.cpp's converter load as they are).
Pairs are laid out as llama.cpp's server lays them out: [BOS] query [EOS] [SEP] document [EOS], each special
token where the vocabulary asks for it. Runs only on its model's worker thread.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import invalid
from ..runtime.compute import on_lane


class CrossEncoderBackend:
    """Scores pairs with the model's classification head; the score is the sigmoid of its first output."""

    def __init__(self, path: str, **settings: Any) -> None:
        import llama_cpp

        from .backend import LlamaBackend

        self.L = llama_cpp
        self.base = LlamaBackend(path, embedding=True, pooling="rank", normalize=False, **settings)
        self.llama = self.base.llama
        self.vocab = self.llama._model.vocab
        if self.L.llama_pooling_type(self.llama._ctx.ctx) != self.L.LLAMA_POOLING_TYPE_RANK:
            raise ValueError(f"{path} has no rank pooling (not a cross-encoder)")

    @property
    def n_ctx(self) -> int:
        return self.base.n_ctx

    @property
    def weights_bytes(self) -> int:
        return self.base.weights_bytes

    def pair(self, query: list[int], document: list[int]) -> list[int]:
        """The tokens of one (query, document) pair, with the special tokens this vocabulary adds."""
        L, vocab = self.L, self.vocab
        eos = L.llama_vocab_eos(vocab)
        eos = eos if eos >= 0 else L.llama_vocab_sep(vocab)
        tokens = [L.llama_vocab_bos(vocab)] if L.llama_vocab_get_add_bos(vocab) else []
        tokens += query
        tokens += [eos] if L.llama_vocab_get_add_eos(vocab) else []
        tokens += [L.llama_vocab_sep(vocab)] if L.llama_vocab_get_add_sep(vocab) else []
        tokens += document
        tokens += [eos] if L.llama_vocab_get_add_eos(vocab) else []
        return tokens

    def score(self, query: str, documents: list[str], cancelled: Callable[[], bool] = lambda: False
              ) -> Iterator[tuple[float, int]]:
        """(score in 0..1, tokens read) per document, in order; stops early when ``cancelled()``."""
        asked = self.base.tokenize(query, add_bos=False, special=False)
        for i, document in enumerate(documents):
            if cancelled():
                return
            tokens = self.pair(asked, self.base.tokenize(document, add_bos=False, special=False))
            if len(tokens) > self.n_ctx:
                raise invalid(f"query and documents[{i}] are {len(tokens)} tokens together; this reranker reads "
                              f"at most {self.n_ctx}", field=f"documents[{i}]")
            yield 1.0 / (1.0 + math.exp(-max(-700.0, min(700.0, self.logit(tokens))))), len(tokens)

    def logit(self, tokens: list[int]) -> float:
        """The head's first output for one pair, from one forward pass."""
        llama = self.llama
        llama._ctx.kv_cache_clear()
        llama._batch.reset()
        llama._batch.add_sequence(tokens, 0, True)
        on_lane(llama._ctx.decode, llama._batch)   # llama.cpp computes on the process's compute lane
        return float(self.L.llama_get_embeddings_seq(llama._ctx.ctx, 0)[0])

    def close(self) -> None:
        self.base.close()
