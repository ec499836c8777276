"""The model side of continuous batching: a context holding one KV sequence per slot, decoded one batch at a time.

``BatchScheduler`` (batching.py) owns the slot lifecycle (admission, prefill, stops, budgets, release) and
drives a ``Decoder``. ``LlamaDecoder`` is llama.cpp's; the test kit's fake chat model is another, so the
fake runs through the very same scheduler.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from ..errors import invalid
from .generation import DEFAULT_SEED, SamplingParams


class BatchEntry(NamedTuple):
    """One token of a batch: which sequence, which token at which position, and whether to compute its logits."""

    seq_id: int
    token: int
    pos: int
    logits: bool


class Decoder(Protocol):
    """A multi-sequence model context, used by one thread (its model's worker) only.

    ``verifies``: its ``sample`` gives exactly one token per logits row and ``truncate`` can drop a sequence's
    tail, so the scheduler may put drafted tokens in a batch and keep only those the samples agree with.
    """

    verifies: bool

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        """Evaluate one batch; raises RuntimeError when the model cannot."""

    def sampler(self, params: SamplingParams, tokens: Sequence[int]) -> Any:
        """A new sampler for one request (its prompt ``tokens``); raises the SDK's errors for what it refuses."""

    def sample(self, sampler: Any, index: int) -> list[int]:
        """The next token of the sequence whose logits are at ``index`` of the last batch (a model gives one).
        A scripted source may give several (a piece of text at once; they need no cache) or none yet (a paced
        source: the scheduler asks again at its next step)."""

    def free_sampler(self, sampler: Any) -> None:
        """Release a sampler."""

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens."""

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for (part of a UTF-8 character, possibly)."""

    def truncate(self, seq_id: int, start: int) -> bool:
        """Forget the sequence's cells from position ``start`` on; False when the cache cannot drop a tail."""

    def clear(self, seq_id: int) -> None:
        """Forget every cell of the sequence."""

    def copy(self, source: int, target: int) -> None:
        """Give ``target`` a copy of ``source``'s cells (``target`` must be empty)."""

    def close(self) -> None:
        """Free the context."""


class LlamaDecoder:
    """A llama.cpp context with ``n_parallel`` sequences of ``n_ctx_per_seq`` cells each."""

    def __init__(self, llama: Any, *, n_parallel: int, n_ctx_per_seq: int, n_batch: int, n_threads: int) -> None:
        import llama_cpp as L

        self.L = L
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx_per_seq * n_parallel
        params.n_batch = n_batch
        params.n_ubatch = min(n_batch, 512)
        params.n_seq_max = n_parallel
        params.n_threads = params.n_threads_batch = n_threads
        # Each sequence gets its own n_ctx_per_seq cells: its attention never sees another's cache,
        # so its numbers (and a seeded request's text) do not depend on what else is cached.
        params.kv_unified = False
        params.no_perf = True
        self.ctx = L.llama_init_from_model(llama._model.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create the batched context (memory?)")
        self.memory = L.llama_get_memory(self.ctx)
        model = llama._model.model   # a recurrent state cannot drop the cells of rejected drafts
        self.verifies = not (L.llama_model_is_recurrent(model) or L.llama_model_is_hybrid(model))
        self.vocab = llama._model.vocab
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(max(n_batch, n_parallel), 0, 1)
        self._piece = ctypes.create_string_buffer(256)

    def decode(self, entries: Sequence[BatchEntry]) -> None:
        batch = self.batch
        for i, (seq_id, token, pos, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq_id, logits
        batch.n_tokens = len(entries)
        code = self.L.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def sampler(self, params: SamplingParams, tokens: Sequence[int]) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                self.n_vocab, 64, params.repetition_penalty, params.frequency_penalty, params.presence_penalty))
        if params.grammar:
            grammar = L.llama_sampler_init_grammar(self.vocab, params.grammar.gbnf.encode(), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise invalid("the grammar for this request could not be parsed by llama.cpp")
            L.llama_sampler_chain_add(chain, grammar)
        if params.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(params.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(params.temperature))
            seed = DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    def sample(self, sampler: Any, index: int) -> list[int]:
        return [int(self.L.llama_sampler_sample(sampler, self.ctx, index))]

    def free_sampler(self, sampler: Any) -> None:
        self.L.llama_sampler_free(sampler)

    def is_end(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int) -> bytes:
        n = self.L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:max(0, n)]

    def truncate(self, seq_id: int, start: int) -> bool:
        return bool(self.L.llama_memory_seq_rm(self.memory, seq_id, start, -1))

    def clear(self, seq_id: int) -> None:
        self.L.llama_memory_seq_rm(self.memory, seq_id, -1, -1)

    def copy(self, source: int, target: int) -> None:
        self.L.llama_memory_seq_cp(self.memory, source, target, -1, -1)

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None
