"""Continuous batching: every active request of a model advances in one llama.cpp decode per step.

Each request gets a sequence id (a slot) in one shared context. A step puts one token per
generating sequence into the batch, fills the rest with prompt chunks of sequences still
prefilling, decodes once, and samples each sequence with its own llama.cpp sampler chain
(penalties, grammar, top-k/p, min-p, temperature, seeded dist). A slot keeps its KV cells after
its request ends, so a later prompt that starts the same way (the next turn, a shared system
prompt) evaluates only its new tokens. Each sequence has its own KV cells (kv_unified off).
"""
from __future__ import annotations

import codecs
import ctypes
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import invalid
from ..runtime.channel import ResultStream
from .backend import DEFAULT_SEED, SamplingParams, Started, TextDelta, _StopMatcher

logger = logging.getLogger("polargrid_local")

MIN_BORROW = 16  # shorter shared prefixes are cheaper to evaluate than to copy a KV buffer


@dataclass
class PromptJob:
    """One prompt to complete: the unit the scheduler admits (a chat request is one)."""

    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stops: list[str]
    stream: ResultStream[Any]
    index: int = 0
    siblings: list[int] = field(default_factory=lambda: [1])  # prompts of this request still running
    ctx: Any = None  # the request's JobContext: its queue time ends when a prompt gets a slot
    probe: list[int] | None = None  # score these tokens as the prompt's next token (Probed) instead of generating


@dataclass(frozen=True)
class Probed:
    """A probe job's answer: the log-probability of each probe token as the next token after its prompt."""

    logprobs: list[float]
    prompt_tokens: int
    index: int = 0


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)   # tokens whose KV cells this sequence holds
    job: PromptJob | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens still to evaluate
    next_token: int | None = None                     # sampled, not yet decoded
    produced: int = 0
    budget: int = 0
    sampler: Any = None
    decoder: Any = None
    stops: _StopMatcher | None = None


class BatchScheduler:
    """Owns a multi-sequence llama.cpp context; runs on the model's worker thread only."""

    def __init__(self, llama, *, n_parallel: int, n_ctx_per_seq: int, n_batch: int, n_threads: int,
                 prefill_chunk: int = 64) -> None:
        import llama_cpp as L

        self.L = L
        self.llama = llama
        self.n_parallel = n_parallel
        self.n_ctx_per_seq = n_ctx_per_seq
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
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
        self.capacity = L.llama_n_ctx(self.ctx)
        self.memory = L.llama_get_memory(self.ctx)
        self.vocab = llama._model.vocab
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.batch = L.llama_batch_init(max(n_batch, n_parallel), 0, 1)
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.waiting: deque[PromptJob] = deque()
        self._piece = ctypes.create_string_buffer(256)
        self.tokens_generated = 0
        self.prompt_tokens_evaluated = 0
        self.prompt_tokens_borrowed = 0

    # -- admission -----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.job is not None for s in self.slots)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    def admit(self, job: PromptJob) -> None:
        self.waiting.append(job)

    def _assign(self) -> None:
        while self.waiting:
            job = self.waiting[0]
            if job.stream.cancelled:
                self.waiting.popleft()
                job.stream.finish()
                continue
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            self.waiting.popleft()
            if job.ctx is not None:
                job.ctx.mark_started()
            # A seeded request evaluates its whole prompt, so its logits do not depend on what the
            # cache held: the same seed gives the same text.
            reuse = job.params.seed is None
            slot = max(free, key=lambda s: _common_prefix(s.cached, job.tokens) if reuse else -len(s.cached))
            common = min(_common_prefix(slot.cached, job.tokens), len(job.tokens) - 1) if reuse else 0
            if reuse:
                common = self._borrow_prefix(slot, job.tokens, common)
            if not self.L.llama_memory_seq_rm(self.memory, slot.seq_id, common, -1):
                # some caches (recurrent, sliding-window) cannot drop a tail: start the sequence afresh
                self.L.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                common = 0
            slot.cached = slot.cached[:common]
            try:
                slot.sampler = self._sampler(job.params)
            except BaseException as exc:
                job.stream.finish(exc)
                continue
            slot.job, slot.pending, slot.next_token, slot.produced = job, job.tokens[common:], None, 0
            slot.budget = min(job.max_tokens, self.n_ctx_per_seq - len(job.tokens))
            slot.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            slot.stops = _StopMatcher(job.stops)
            self._push(slot, Started(prompt_tokens=len(job.tokens), index=job.index))

    def _borrow_prefix(self, slot: _Slot, tokens: list[int], common: int) -> int:
        """Copy another slot's cache when it shares a longer prefix (a common system prompt)."""
        donor = max((s for s in self.slots if s is not slot), key=lambda s: _common_prefix(s.cached, tokens),
                    default=None)
        if donor is None:
            return common
        shared = min(_common_prefix(donor.cached, tokens), len(tokens) - 1)
        if shared < common + MIN_BORROW:
            return common
        # Across KV streams llama.cpp copies whole buffers only; the tail is trimmed right after.
        self.L.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
        self.L.llama_memory_seq_cp(self.memory, donor.seq_id, slot.seq_id, -1, -1)
        slot.cached = list(donor.cached)
        self.prompt_tokens_borrowed += shared
        return shared

    def _sampler(self, p: SamplingParams):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                self.n_vocab, 64, p.repetition_penalty, p.frequency_penalty, p.presence_penalty))
        if p.grammar:
            grammar = L.llama_sampler_init_grammar(self.vocab, p.grammar.gbnf.encode(), b"root")
            if not grammar:
                L.llama_sampler_free(chain)
                raise invalid("the grammar for this request could not be parsed by llama.cpp")
            L.llama_sampler_chain_add(chain, grammar)
        if p.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            if p.top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(p.top_p, 1))
            if p.min_p > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(p.min_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(p.temperature))
            seed = DEFAULT_SEED if p.seed is None else p.seed & 0xFFFFFFFF
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
        return chain

    # -- one step ------------------------------------------------------------------------

    def step(self) -> None:
        """Admit waiting requests, decode one batch, sample, and hand each request its text."""
        for slot in self.slots:
            if slot.job is not None and slot.job.stream.cancelled:
                self._release(slot, finish=None)
        self._assign()
        generating = [s for s in self.slots if s.job is not None and s.next_token is not None]
        entries: list[tuple[int, int, int, bool]] = [(s.seq_id, s.next_token, len(s.cached), True) for s in generating]
        prefill: list[tuple[_Slot, list[int]]] = []
        waiting_first = sum(1 for s in self.slots if s.job is not None and s.pending)
        # Several prompts at once: small chunks, in order, so the first ones start streaming early
        # instead of every request waiting for one big prefill (time to first token, p50).
        budget = self.n_batch if waiting_first <= 1 else min(self.n_batch, self.prefill_chunk)
        room = budget - len(entries) if waiting_first > 1 else self.n_batch - len(entries)
        for slot in self.slots:   # prompt chunks fill what the running streams leave of the batch
            if room <= 0:
                break
            if slot.job is None or not slot.pending:
                continue
            chunk = slot.pending[:room]
            ends = len(chunk) == len(slot.pending)
            start = len(slot.cached)
            entries += [(slot.seq_id, tok, start + i, ends and i == len(chunk) - 1) for i, tok in enumerate(chunk)]
            prefill.append((slot, chunk))
            room -= len(chunk)
        if not entries:
            return
        batch = self.batch
        for i, (seq_id, token, pos, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq_id, logits
        batch.n_tokens = len(entries)
        code = self.L.llama_decode(self.ctx, batch)
        if code != 0:
            self._fail_all(RuntimeError(f"llama_decode returned {code}"))
            return
        to_sample = []
        for i, slot in enumerate(generating):
            slot.cached.append(slot.next_token)
            slot.next_token = None
            to_sample.append((slot, i))
        offset = len(generating)
        for slot, chunk in prefill:
            slot.cached.extend(chunk)
            slot.pending = slot.pending[len(chunk):]
            self.prompt_tokens_evaluated += len(chunk)
            offset += len(chunk)
            if not slot.pending:
                to_sample.append((slot, offset - 1))
        for slot, index in to_sample:
            if slot.job is not None:
                self._sample(slot, index)

    def _sample(self, slot: _Slot, index: int) -> None:
        L = self.L
        if slot.job is not None and slot.job.probe is not None:
            self._probe(slot, index)
            return
        token = L.llama_sampler_sample(slot.sampler, self.ctx, index)
        if L.llama_vocab_is_eog(self.vocab, token):
            self._release(slot, finish="stop")
            return
        slot.produced += 1
        self.tokens_generated += 1
        n = L.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, False)
        text = slot.decoder.decode(self._piece.raw[:max(0, n)])
        visible, hit = slot.stops.feed(text)
        if visible:
            self._push(slot, TextDelta(visible, index=slot.job.index))
        if hit:
            self._release(slot, finish="stop", flush=False)
        elif slot.produced >= slot.budget:
            self._release(slot, finish="length")
        else:
            slot.next_token = token

    def _probe(self, slot: _Slot, index: int) -> None:
        """The prompt's next-token distribution, read at its probe tokens; the slot is free at once."""
        logits = np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        job = slot.job
        assert job is not None and job.probe is not None
        self._push(slot, Probed(log_probs(logits, job.probe), len(job.tokens), job.index))
        self._release(slot, finish="probed")

    def _release(self, slot: _Slot, finish: str | None, flush: bool = True) -> None:
        job = slot.job
        if finish is not None and job.probe is None:
            tail = slot.stops.flush(slot.decoder.decode(b"", final=True)) if flush else ""
            if tail:
                self._push(slot, TextDelta(tail, index=job.index))
            self._push(slot, TextDelta("", finish_reason=finish, prompt_tokens=len(job.tokens),
                                       completion_tokens=slot.produced, index=job.index))
        job.siblings[0] -= 1
        if job.siblings[0] <= 0 or finish is None:
            job.stream.finish()
        slot.pending = []  # a request stopped mid-prompt keeps only the tokens evaluated
        self.L.llama_sampler_free(slot.sampler)
        slot.job, slot.sampler, slot.next_token = None, None, None

    def _push(self, slot: _Slot, item: Any) -> None:
        try:
            slot.job.stream.push(item)
        except Exception:  # the reader left; the next step releases the slot
            pass

    def _fail_all(self, exc: BaseException) -> None:
        for slot in self.slots:
            if slot.job is not None:
                job = slot.job
                job.stream.finish(exc)
                self._release(slot, finish=None)
                self.L.llama_memory_seq_rm(self.memory, slot.seq_id, -1, -1)
                slot.cached = []

    def close(self, error: BaseException | None = None) -> None:
        """Free the context; requests still here end with ``error`` (the engine cut them short), never cleanly."""
        if error is None:
            from ..errors import ServerError

            error = ServerError("the model was unloaded before this request finished; retry the request", 503)
        for slot in self.slots:
            if slot.job is not None:
                job = slot.job
                job.stream.finish(error)
                self._release(slot, finish=None)
        while self.waiting:
            self.waiting.popleft().stream.finish(error)
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None


def log_probs(logits: np.ndarray, tokens: list[int]) -> list[float]:
    """The log-probability of each of ``tokens`` under the softmax of one row of logits."""
    top = float(logits.max())
    log_total = top + float(np.log(np.exp(logits - top).sum()))
    return [float(logits[t]) - log_total for t in tokens]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class BatchedLlamaBackend:
    """A chat model served with continuous batching: LlamaBackend for the model, tokenizer and
    template; BatchScheduler for generation."""

    def __init__(self, path: str, *, n_ctx: int = 2048, n_parallel: int = 8, max_queue: int = 64,
                 n_batch: int = 512, **llama_settings: Any) -> None:
        from .backend import LlamaBackend

        # The high-level Llama's own context serves tokenizing only; generation has its own.
        self.base = LlamaBackend(path, n_ctx=256, n_batch=min(n_batch, 256), **llama_settings)
        self.scheduler = BatchScheduler(self.base.llama, n_parallel=n_parallel, n_ctx_per_seq=n_ctx,
                                        n_batch=n_batch, n_threads=self.base.n_threads)
        self.max_queue = max_queue
        self.n_parallel = n_parallel
        self.n_ctx = n_ctx

    def __getattr__(self, name: str) -> Any:  # tokenize, render_chat, chat_template, ...
        return getattr(self.base, name)

    @property
    def tokens_generated(self) -> int:
        return self.scheduler.tokens_generated

    @property
    def weights_bytes(self) -> int:
        return self.base.weights_bytes

    def close(self) -> None:
        self.scheduler.close()
        self.base.close()
