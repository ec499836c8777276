"""Continuous batching: every active request of a model advances in one decode per step.

Each request gets a sequence id (a slot) in one shared context (decoder.py). A step puts one token per
generating sequence into the batch, fills the rest with prompt chunks of sequences still
prefilling, decodes once, and samples each sequence with its own llama.cpp sampler chain
(penalties, grammar, top-k/p, min-p, temperature, seeded dist). A slot keeps its KV cells after
its request ends, so a later prompt that starts the same way (the next turn, a shared system
prompt) evaluates only its new tokens. Each sequence has its own KV cells (kv_unified off).
"""
from __future__ import annotations

import codecs
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .decoder import BatchEntry, Decoder, LlamaDecoder
from .drafting import Drafting, SlotDrafts, check_mode
from .generation import SamplingParams, Started, StopMatcher, TextDelta

if TYPE_CHECKING:
    from .prompt_cache import PromptCache

logger = logging.getLogger("polargrid_local")

MIN_BORROW = 16  # shorter shared prefixes are cheaper to evaluate than to copy a KV buffer


@dataclass
class PromptJob:
    """One prompt to complete: the unit the scheduler admits (a chat request is one)."""

    tokens: list[int]
    params: SamplingParams
    max_tokens: int
    stops: list[str]
    stream: Any   # the request's ResultStream: this prompt's events are pushed to it
    index: int = 0
    siblings: list[int] = field(default_factory=lambda: [1])  # prompts of this request still running
    ctx: Any = None  # the request's JobContext: its queue time ends when a prompt gets a slot
    probe: list[int] | None = None  # score these tokens as the prompt's next token (Probed) instead of generating
    pin: Any = None  # cache_prompt: a Future resolved with the prompt cache entry once it is saved, pinned


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
    utf8: Any = None                                  # the incremental UTF-8 decoder of its text
    stops: StopMatcher | None = None
    awaiting: bool = False                            # its last sample had no token yet (a paced source)
    sample_index: int = 0
    drafts: SlotDrafts | None = None                  # its prompt-lookup drafting (None: one token per step)


class BatchScheduler:
    """The slot lifecycle of one model's requests over a ``Decoder``; runs on the model's worker thread only.

    The decoder is the model (llama.cpp's context, or the test kit's scripted one): this class decides what
    goes into each batch, samples each sequence with its own sampler, matches stops, enforces budgets and
    hands each request its events.
    """

    def __init__(self, decoder: Decoder, *, n_parallel: int, n_ctx_per_seq: int, n_batch: int,
                 prefill_chunk: int = 64, prompt_cache: PromptCache | None = None,
                 speculative: str = "prompt-lookup") -> None:
        self.decoder = decoder
        self.prompt_cache = prompt_cache
        self.n_parallel = n_parallel
        self.n_ctx_per_seq = n_ctx_per_seq
        self.n_batch = n_batch
        self.prefill_chunk = prefill_chunk
        self.slots = [_Slot(i) for i in range(n_parallel)]
        self.waiting: deque[PromptJob] = deque()
        self.tokens_generated = 0
        self.prompt_tokens_evaluated = 0
        self.prompt_tokens_borrowed = 0
        # Drafts need a decoder that gives one token per sample and can drop a sequence's tail.
        verifies = getattr(decoder, "verifies", False)
        self.drafting = Drafting(speculative) if verifies and check_mode(speculative) != "off" else None

    # -- admission -----------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s.job is not None for s in self.slots)

    @property
    def active(self) -> int:
        return sum(1 for s in self.slots if s.job is not None)

    @property
    def queued(self) -> int:
        """Prompts admitted but waiting for a slot."""
        return len(self.waiting)

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
            source, saved_logits = "memory", None
            if reuse and self.prompt_cache is not None:
                common, source, saved_logits = self._restore_prefix(slot, job.tokens, common)
            if not self.decoder.truncate(slot.seq_id, common):
                # some caches (recurrent, sliding-window) cannot drop a tail: start the sequence afresh
                self.decoder.clear(slot.seq_id)
                common = 0
            slot.cached = slot.cached[:common]
            try:
                slot.sampler = self.decoder.sampler(job.params, job.tokens)
            except BaseException as exc:
                job.stream.finish(exc)
                continue
            slot.job, slot.pending, slot.next_token, slot.produced = job, job.tokens[common:], None, 0
            slot.awaiting = False
            slot.budget = min(job.max_tokens, self.n_ctx_per_seq - len(job.tokens))
            slot.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            slot.stops = StopMatcher(job.stops)
            slot.drafts = self.drafting.start(job.tokens) if self.drafting and job.params.speculative else None
            self._push(slot, Started(prompt_tokens=len(job.tokens), index=job.index, cached_tokens=common,
                                     cache=source if common else None))
            if saved_logits is not None and common == len(job.tokens):
                self._sample_saved(slot, saved_logits)

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
        self.decoder.clear(slot.seq_id)
        self.decoder.copy(donor.seq_id, slot.seq_id)
        slot.cached = list(donor.cached)
        self.prompt_tokens_borrowed += shared
        return shared

    def _restore_prefix(self, slot: _Slot, tokens: list[int], common: int) -> tuple[int, str, Any]:
        """Load the prompt's longest prefix saved on disk when it beats the ``common`` tokens held in memory:
        (tokens now cached, where from, the saved logits of the last prompt token when the whole prompt was)."""
        assert self.prompt_cache is not None
        restored = self.prompt_cache.restore(self.decoder, slot.seq_id, tokens, common)
        if restored is None:
            return common, "memory", None
        slot.cached = restored.tokens
        if restored.logits is not None:
            return len(tokens), "disk", restored.logits
        return min(_common_prefix(restored.tokens, tokens), len(tokens) - 1), "disk", None

    def _sample_saved(self, slot: _Slot, logits: Any) -> None:
        """The whole prompt came from disk: its first token is sampled from the saved logits of its last token
        (bit for bit what processing the prompt gave), with nothing to decode first."""
        assert slot.job is not None
        try:
            tokens = self.decoder.sample_logits(slot.sampler, logits)
        except Exception as exc:
            slot.job.stream.finish(exc)
            self._release(slot, finish=None)
            return
        self._emit(slot, tokens)

    def _remember_prompts(self, prefilled: list[tuple[_Slot, PromptJob, int]]) -> None:
        """Hand the state of prompts processed this step to the prompt cache (after their first token)."""
        for slot, job, index in prefilled:
            # the sequence holds exactly the prompt until the first sampled token is decoded at the next step
            if self.prompt_cache is not None and slot.cached == job.tokens:
                self.prompt_cache.remember(self.decoder, slot.seq_id, job.tokens, job.pin, index)
            elif job.pin is not None and not job.pin.done():
                from ..errors import invalid

                job.pin.set_exception(invalid("this model has no prompt cache (prompt_cache is off, or it serves "
                                              "one request at a time)"))

    # -- one step ------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit waiting requests, decode one batch, sample, and hand each request its text. False when
        nothing could advance (every active sequence waits on a paced source)."""
        for slot in self.slots:
            if slot.job is not None and slot.job.stream.cancelled:
                self._release(slot, finish=None)
        self._assign()
        advanced = False
        for slot in self.slots:   # sequences whose last sample had no token yet: ask again
            if slot.job is not None and slot.awaiting:
                advanced = self._sample(slot, slot.sample_index) or advanced
        generating = [s for s in self.slots if s.job is not None and s.next_token is not None]
        prefill: list[tuple[_Slot, list[int]]] = []
        prompt_entries: list[BatchEntry] = []
        waiting_first = sum(1 for s in self.slots if s.job is not None and s.pending)
        # Several prompts at once: small chunks, in order, so the first ones start streaming early
        # instead of every request waiting for one big prefill (time to first token, p50).
        budget = self.n_batch if waiting_first <= 1 else min(self.n_batch, self.prefill_chunk)
        room = budget - len(generating) if waiting_first > 1 else self.n_batch - len(generating)
        for slot in self.slots:   # prompt chunks fill what the running streams leave of the batch
            if room <= 0:
                break
            if slot.job is None or not slot.pending:
                continue
            chunk = slot.pending[:room]
            ends = len(chunk) == len(slot.pending)
            start = len(slot.cached)
            prompt_entries += [BatchEntry(slot.seq_id, tok, start + i, ends and i == len(chunk) - 1)
                               for i, tok in enumerate(chunk)]
            prefill.append((slot, chunk))
            room -= len(chunk)
        if self.drafting is not None:
            self._plan_drafts(generating, len(prompt_entries))
        entries: list[BatchEntry] = []
        for s in generating:   # its next token, then its draft (if any): logits for each
            start = len(s.cached)
            entries.append(BatchEntry(s.seq_id, s.next_token, start, True))  # type: ignore[arg-type]
            entries += [BatchEntry(s.seq_id, tok, start + 1 + j, True) for j, tok in enumerate(_draft(s))]
        entries += prompt_entries
        if not entries:
            return advanced
        started = time.perf_counter()
        try:
            self.decoder.decode(entries)
        except Exception as exc:
            self.fail_all(exc)
            return True
        to_sample = []
        offset = 0
        for slot in generating:
            slot.cached.append(slot.next_token)  # type: ignore[arg-type]  # generating slots have one
            slot.next_token = None
            to_sample.append((slot, offset))
            offset += 1 + len(_draft(slot))
        for slot, chunk in prefill:
            slot.cached.extend(chunk)
            slot.pending = slot.pending[len(chunk):]
            self.prompt_tokens_evaluated += len(chunk)
            offset += len(chunk)
            if not slot.pending:
                to_sample.append((slot, offset - 1))
        prefilled = [(slot, slot.job, index) for slot, index in to_sample[len(generating):]]
        for slot, index in to_sample:
            if slot.job is None:
                continue
            if _draft(slot):
                self._verify(slot, index)
            else:
                self._sample(slot, index)
        if self.drafting is not None and not prompt_entries:   # a prompt chunk computes few logits: another cost
            self.drafting.costs.record(len(entries), time.perf_counter() - started)
        if prefilled:
            self._remember_prompts(prefilled)  # type: ignore[arg-type]  # slots in prefill have a job
        return True

    def _plan_drafts(self, generating: list[_Slot], prompt_tokens: int) -> None:
        """This step's drafts: what the cost model says pays beside the step's other tokens, within each
        sequence's budget and context and the batch's room. None beside a prompt chunk: the cost model knows
        decode steps only (their every token computes logits), and the chunk's time would swamp the gain."""
        for slot in generating:
            if slot.drafts is not None:
                slot.drafts.draft = []
        if prompt_tokens:
            return
        eligible = [(slot.drafts, min(slot.budget - slot.produced - 1, self.n_ctx_per_seq - len(slot.cached) - 1))
                    for slot in generating if slot.drafts is not None]
        assert self.drafting is not None
        if eligible:
            self.drafting.plan(eligible, generating=len(generating), room=self.n_batch - len(generating))

    def _verify(self, slot: _Slot, index: int) -> None:
        """Sample the slot's next token and each drafted position after it, in order, with its own sampler
        chain; keep the drafts the samples equal, drop the KV cells of the rest, hand on the samples."""
        assert slot.job is not None and slot.drafts is not None and self.drafting is not None
        draft = slot.drafts.draft
        tokens: list[int] = []
        try:
            for j in range(len(draft) + 1):
                token = self.decoder.sample(slot.sampler, index + j)[0]
                tokens.append(token)
                if j == len(draft) or token != draft[j] or self.decoder.is_end(token):
                    break
        except Exception as exc:   # this sequence's failure ends its request only
            slot.job.stream.finish(exc)
            self._release(slot, finish=None)
            return
        accepted = len(tokens) - 1
        self.drafting.learn(slot.drafts, accepted)
        self.decoder.truncate(slot.seq_id, len(slot.cached) + accepted)
        self._emit(slot, tokens)

    def _sample(self, slot: _Slot, index: int) -> bool:
        """Sample the slot's next tokens and hand on their text; False when the source had none yet."""
        assert slot.job is not None
        if slot.job.probe is not None:
            self._probe(slot, index)
            return True
        try:
            tokens = self.decoder.sample(slot.sampler, index)
        except Exception as exc:   # this sequence's failure ends its request only
            slot.job.stream.finish(exc)
            self._release(slot, finish=None)
            return True
        slot.awaiting, slot.sample_index = not tokens, index
        if tokens:
            self._emit(slot, tokens)
        return bool(tokens)

    def _emit(self, slot: _Slot, tokens: list[int]) -> None:
        """The sequence's new tokens, in order: counted against its budget, matched against its stops, their
        text handed on in one piece. The last one is decoded at the next step (the others are in the cache)."""
        job, stops = slot.job, slot.stops
        assert job is not None and stops is not None
        if slot.drafts is not None:
            slot.drafts.extend(tokens)
        text, finish, flush = "", None, True
        for token in tokens:
            if self.decoder.is_end(token):
                finish = "stop"
                break
            slot.produced += 1
            self.tokens_generated += 1
            visible, hit = stops.feed(slot.utf8.decode(self.decoder.piece(token)))
            text += visible
            if hit:
                finish, flush = "stop", False
                break
            if slot.produced >= slot.budget:
                finish = "length"
                break
        if text:
            self._push(slot, TextDelta(text, index=job.index))
        if finish is not None:
            self._release(slot, finish=finish, flush=flush)
            return
        slot.cached.extend(tokens[:-1])
        slot.next_token = tokens[-1]

    def _probe(self, slot: _Slot, index: int) -> None:
        """The prompt's next-token distribution, read at its probe tokens; the slot is free at once."""
        job = slot.job
        assert job is not None and job.probe is not None
        self._push(slot, Probed(self.decoder.logprobs(index, job.probe), len(job.tokens), job.index))
        self._release(slot, finish="probed")

    def _release(self, slot: _Slot, finish: str | None, flush: bool = True) -> None:
        job = slot.job
        assert job is not None and slot.stops is not None
        if finish is not None and job.probe is None:
            tail = slot.stops.flush(slot.utf8.decode(b"", final=True)) if flush else ""
            if tail:
                self._push(slot, TextDelta(tail, index=job.index))
            drafts = slot.drafts
            self._push(slot, TextDelta("", finish_reason=finish, prompt_tokens=len(job.tokens),
                                       completion_tokens=slot.produced, index=job.index,
                                       drafted=drafts.drafted if drafts else 0,
                                       accepted=drafts.accepted if drafts else 0))
        job.siblings[0] -= 1
        if job.siblings[0] <= 0 or finish is None:
            job.stream.finish()
        slot.pending = []  # a request stopped mid-prompt keeps only the tokens evaluated
        self.decoder.free_sampler(slot.sampler)
        slot.job, slot.sampler, slot.next_token, slot.awaiting, slot.drafts = None, None, None, False, None

    def _push(self, slot: _Slot, item: Any) -> None:
        assert slot.job is not None
        try:
            slot.job.stream.push(item)
        except Exception:  # the reader left; the next step releases the slot
            pass

    def fail_all(self, exc: BaseException) -> None:
        """End every running request with ``exc`` and forget what their sequences held (a failed step)."""
        for slot in self.slots:
            if slot.job is not None:
                job = slot.job
                job.stream.finish(exc)
                self._release(slot, finish=None)
                self.decoder.clear(slot.seq_id)
                slot.cached = []

    def close(self, error: BaseException | None = None) -> None:
        """Free the model context; requests still here end with ``error`` (the engine cut them short), never cleanly."""
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
        self.decoder.close()


def _draft(slot: _Slot) -> list[int]:
    return slot.drafts.draft if slot.drafts is not None else []


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
                 n_batch: int = 512, prompt_cache: Any = None, model_id: str = "", model_sha256: str | None = None,
                 speculative: str = "prompt-lookup", **llama_settings: Any) -> None:
        """``prompt_cache``: a PromptCacheConfig (prompt_cache.py), or None for no cache on disk; ``speculative``:
        "prompt-lookup" (drafts, llm/drafting.py) or "off"."""
        from .backend import LlamaBackend
        from .prompt_cache import open_prompt_cache

        # The high-level Llama's own context serves tokenizing only; generation has its own.
        self.base = LlamaBackend(path, n_ctx=256, n_batch=min(n_batch, 256), **llama_settings)
        decoder = LlamaDecoder(self.base.llama, n_parallel=n_parallel, n_ctx_per_seq=n_ctx, n_batch=n_batch,
                               n_threads=self.base.n_threads)
        kv, state = decoder.state_layout()
        self.prompt_cache = open_prompt_cache(prompt_cache, model_id or Path(path).stem, path, model_sha256, n_ctx,
                                              {**kv, "on_gpu": self.base.n_gpu_layers != 0}, state)
        self.scheduler = BatchScheduler(decoder, n_parallel=n_parallel, n_ctx_per_seq=n_ctx, n_batch=n_batch,
                                        prompt_cache=self.prompt_cache, speculative=speculative)
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

    def speculative_stats(self) -> dict[str, Any]:
        """Drafting since load, for get_model_status (types.SpeculativeStats)."""
        drafting = self.scheduler.drafting
        if drafting is None:
            return {"mode": "off"}
        return drafting.stats()

    def close(self) -> None:
        self.scheduler.close()
        self.base.close()
        if self.prompt_cache is not None:
            self.prompt_cache.close()
