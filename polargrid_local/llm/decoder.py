"""The model side of continuous batching: a context holding one KV sequence per slot, decoded one batch at a time.

``BatchScheduler`` (batching.py) owns the slot lifecycle (admission, prefill, stops, budgets, release) and
drives a ``Decoder``. ``LlamaDecoder`` is llama.cpp's; the test kit's fake chat model is another, so the
fake runs through the very same scheduler.
"""
from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from ..errors import invalid
from ..runtime.compute import on_lane
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

    def logprobs(self, index: int, tokens: Sequence[int]) -> list[float]:
        """The log-probability of each of ``tokens`` as the next token, from the logits at ``index``."""

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

    def save_sequence(self, seq_id: int, into: Any = None) -> Any:
        """A copy of the sequence's cells (a buffer, for the prompt cache), written into the spare buffer ``into``
        when it is large enough; None when there is nothing to copy."""

    def load_sequence(self, seq_id: int, data: Any) -> bool:
        """Give the empty sequence the cells ``save_sequence`` copied; False when the data does not fit."""

    def logits(self, index: int) -> Any:
        """A copy of the logits at ``index`` of the last batch (float32), or None."""

    def sample_logits(self, sampler: Any, logits: Any) -> list[int]:
        """The next token sampled from saved ``logits`` (as ``sample`` would from the same logits in the batch)."""

    def close(self) -> None:
        """Free the context."""


class _Sampler(NamedTuple):
    """A request's llama.cpp sampler chain; ``argmax``: the chain is greedy alone (no grammar, no penalties), so
    its token is the logits' argmax, read without building llama.cpp's candidate array (0.1-0.4 ms a token)."""

    chain: Any
    argmax: bool


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
        self.params = params
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
        code = on_lane(self.L.llama_decode, self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode returned {code}")

    def sampler(self, params: SamplingParams, tokens: Sequence[int]) -> Any:
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        penalties = params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty
        if penalties:
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
        return _Sampler(chain, argmax=params.temperature <= 0 and not penalties and not params.grammar)

    def sample(self, sampler: Any, index: int) -> list[int]:
        if sampler.argmax:   # llama.cpp's greedy sampler keeps the first of equal logits, as argmax does
            row = self.L.llama_get_logits_ith(self.ctx, index)
            return [int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())]
        return [int(self.L.llama_sampler_sample(sampler.chain, self.ctx, index))]

    def free_sampler(self, sampler: Any) -> None:
        self.L.llama_sampler_free(sampler.chain)

    def logprobs(self, index: int, tokens: Sequence[int]) -> list[float]:
        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return log_probs(logits, tokens)

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

    def save_sequence(self, seq_id: int, into: Any = None) -> Any:
        size = self.L.llama_state_seq_get_size(self.ctx, seq_id)
        if not size:
            return None
        import numpy as np

        # A reused buffer spares the page faults of fresh memory (most of the time on a VM: 130 ms for 47 MB,
        # against 8 ms to copy into memory already touched). Fresh memory is not zeroed: llama.cpp writes it.
        buffer = into if into is not None and into.nbytes >= size else np.empty(size, dtype=np.uint8)
        written = self.L.llama_state_seq_get_data(self.ctx, buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
                                                  size, seq_id)
        return buffer[:written] if written else None

    def load_sequence(self, seq_id: int, data: Any) -> bool:
        view = memoryview(data).cast("B")
        if not view.nbytes:
            return False
        source = (ctypes.c_uint8 * view.nbytes).from_buffer(view) if not view.readonly else \
            (ctypes.c_uint8 * view.nbytes).from_buffer_copy(view)
        return self.L.llama_state_seq_set_data(self.ctx, source, view.nbytes, seq_id) == view.nbytes

    def logits(self, index: int) -> Any:
        import numpy as np

        row = self.L.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).astype(np.float32, copy=True) if row else None

    def sample_logits(self, sampler: Any, logits: Any) -> list[int]:
        import numpy as np

        L = self.L
        values = np.frombuffer(logits, dtype=np.float32)
        if values.shape != (self.n_vocab,):
            raise RuntimeError(f"saved logits of {values.size} tokens for a vocabulary of {self.n_vocab}")
        candidates = np.zeros(self.n_vocab, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        candidates["id"] = np.arange(self.n_vocab, dtype=np.int32)
        candidates["logit"] = values
        array = L.llama_token_data_array(data=candidates.ctypes.data_as(L.llama_token_data_p), size=self.n_vocab,
                                         selected=-1, sorted=False)
        L.llama_sampler_apply(sampler.chain, ctypes.byref(array))   # what llama_sampler_sample does with a row
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler selected no token")
        token = int(array.data[array.selected].id)
        L.llama_sampler_accept(sampler.chain, token)
        return [token]

    def state_layout(self) -> tuple[dict[str, Any], str]:
        """What a saved sequence must share with this context besides the model: the KV cache's types and
        layout (llama.cpp writes one entry per sequence stream, so the number of sequences too), and the
        llama.cpp build's state format."""
        p = self.params
        kv = {"n_seq_max": int(p.n_seq_max), "type_k": int(p.type_k), "type_v": int(p.type_v),
              "flash_attn_type": int(p.flash_attn_type), "offload_kqv": bool(p.offload_kqv),
              "swa_full": bool(p.swa_full), "kv_unified": bool(p.kv_unified)}
        return kv, f"llama-cpp-python {self.L.__version__}, sequence state v{self.L.LLAMA_STATE_SEQ_VERSION}"

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None


def log_probs(logits: np.ndarray, tokens: Sequence[int]) -> list[float]:
    """The log-probability of each of ``tokens`` under the softmax of one row of logits."""
    top = float(logits.max())
    log_total = top + float(np.log(np.exp(logits - top).sum()))
    return [float(logits[t]) - log_total for t in tokens]
