"""Fake chat and embedding backends: what llm/requests.py and the worker's batching path expect of a model.

The chat backend has a scheduler like BatchedLlamaBackend's, so requests go through the same worker
admission, queue limit (RateLimitError), Started/TextDelta events, stop matching and budgets
(max_tokens and n_ctx) as with llama.cpp. What it "generates" comes from the script.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import numpy as np
from polargrid import errors as sdk

from ..llm.backend import Started, TextDelta, _StopMatcher
from ..llm.batching import PromptJob
from .schema import SchemaGenerationError, example_for
from .script import ChatScript, EmbeddingScript, Rule
from .tokens import FakeTokenizer, parse_chat, pieces, render_chat

DEFAULT_EMBEDDING_SIZE = 384  # all-MiniLM-L6-v2's, the default embedding model's


class ScriptError(sdk.ServerError):
    """The script asks for something the request rules out (a reply that breaks its JSON schema)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"fake script: {message}", 500)


@dataclass
class _Run:
    """One prompt being answered: its pieces, where it is, and its budget."""

    job: PromptJob
    pieces: list[str]
    budget: int
    delay: float = 0.0
    error: BaseException | None = None
    error_after: int | None = None
    stall: float | None = None
    stall_after: int = 0
    next_at: float = 0.0
    emitted: int = 0
    produced: int = 0
    stops: _StopMatcher = field(default_factory=lambda: _StopMatcher(()))


class FakeChatBackend:
    """A chat model answering from a ChatScript, with a deterministic tokenizer and ChatML template."""

    chat_template = "chatml (polargrid_local fake)"
    template_mentions_tools = False

    def __init__(self, model_id: str, script: ChatScript, *, n_ctx: int = 2048, n_parallel: int = 8,
                 max_queue: int = 64) -> None:
        self.model_id = model_id
        self.script = script
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.n_parallel = max(1, n_parallel)
        self.max_queue = max_queue
        self.scheduler = FakeScheduler(self)

    @property
    def tokens_generated(self) -> int:
        return self.scheduler.tokens_generated

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def render_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> str:
        return render_chat(messages)

    def add_bos_for_template(self, prompt: str) -> bool:
        return True

    def answer(self, job: PromptJob) -> _Run:
        """Decide the reply for one prompt: the matching rule, or the fake's own answer."""
        prompt = self.tokenizer.detokenize(job.tokens)
        messages = parse_chat(prompt)
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") if messages else prompt
        grammar = job.params.grammar
        rule = self.script.match(text, self.model_id, messages=messages, schema=getattr(grammar, "schema", None))
        rule = rule or Rule()
        if rule.error is not None and rule.after is None:
            raise rule.error
        if rule.pieces is not None:
            replies = rule.pieces
            if grammar is not None:
                _check_fits(grammar, "".join(replies))
        else:
            replies = [self._default(text, grammar)]
        if not rule.chunked:
            replies = pieces("".join(replies))  # one token per chunk, as a model streams
        budget = min(job.max_tokens, self.n_ctx - len(job.tokens))
        return _Run(job, replies, budget, delay=rule.delay, error=rule.error, error_after=rule.after,
                    stall=rule.stall, stall_after=rule.after or 0, stops=_StopMatcher(job.stops))

    def _default(self, text: str, grammar: Any) -> str:
        if grammar is not None and not grammar.free_text:
            try:
                return json.dumps(example_for(grammar.schema))
            except SchemaGenerationError as exc:
                raise ScriptError(str(exc)) from None
        return text if self.script.echoing and text else self.script.default

    def close(self) -> None:
        self.scheduler.close()


def _check_fits(grammar: Any, reply: str) -> None:
    """A constrained model cannot write what its grammar forbids; neither may the script."""
    if grammar.free_text and not reply.lstrip().startswith("{"):
        return
    try:
        document = json.loads(reply)
        if grammar.schema is not None:
            jsonschema.validate(document, grammar.schema)
        elif not isinstance(document, dict):
            raise ValueError("not a JSON object")
    except (ValueError, jsonschema.ValidationError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        raise ScriptError(f"the scripted reply {reply[:80]!r} does not fit this request's {grammar.what} "
                          f"({reason})") from None


class FakeScheduler:
    """Runs on the model's worker thread, like BatchScheduler: admit, step, release."""

    def __init__(self, backend: FakeChatBackend) -> None:
        self.backend = backend
        self.waiting: deque[PromptJob] = deque()
        self.runs: list[_Run] = []
        self.tokens_generated = 0

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.runs)

    @property
    def active(self) -> int:
        return len(self.runs)

    def admit(self, job: PromptJob) -> None:
        self.waiting.append(job)

    def step(self) -> None:
        for run in list(self.runs):
            if run.job.stream.cancelled:
                self._release(run, None)
        self._assign()
        now = time.monotonic()
        advanced = False
        for run in list(self.runs):
            advanced = self._advance(run, now) or advanced
        if self.runs and not advanced:  # everyone is waiting on a delay or a stall: do not spin
            due = min(run.next_at for run in self.runs)
            time.sleep(min(0.005, max(0.0, due - now)) or 0.0005)

    def _assign(self) -> None:
        while self.waiting and len(self.runs) < self.backend.n_parallel:
            job = self.waiting.popleft()
            if job.stream.cancelled:
                job.stream.finish()
                continue
            try:
                run = self.backend.answer(job)
            except BaseException as exc:
                job.stream.finish(exc)
                continue
            if run.stall is not None and run.stall_after == 0:
                run.next_at = time.monotonic() + run.stall
                run.stall = None
            self.runs.append(run)
            self._push(run, Started(prompt_tokens=len(job.tokens), index=job.index))

    def _advance(self, run: _Run, now: float) -> bool:
        if now < run.next_at:
            return False
        if run.stall is not None and run.emitted == run.stall_after:
            run.next_at, run.stall = now + run.stall, None
            return False
        if run.error is not None and run.emitted == run.error_after:
            run.job.stream.finish(run.error)
            self.runs.remove(run)
            return True
        if run.emitted >= len(run.pieces):
            self._release(run, "stop")
            return True
        tokens = pieces(run.pieces[run.emitted])
        take = tokens[: run.budget - run.produced]
        run.emitted += 1
        run.produced += len(take)
        self.tokens_generated += len(take)
        visible, hit = run.stops.feed("".join(take))
        if visible:
            self._push(run, TextDelta(visible, index=run.job.index))
        if hit:
            self._release(run, "stop", flush=False)
        elif run.produced >= run.budget:
            self._release(run, "length")
        else:
            run.next_at = now + run.delay
        return True

    def _release(self, run: _Run, finish: str | None, flush: bool = True) -> None:
        job = run.job
        self.runs.remove(run)
        if finish is not None:
            tail = run.stops.flush("") if flush else ""
            if tail:
                self._push(run, TextDelta(tail, index=job.index))
            self._push(run, TextDelta("", finish_reason=finish, prompt_tokens=len(job.tokens),
                                      completion_tokens=run.produced, index=job.index))
        job.siblings[0] -= 1
        if job.siblings[0] <= 0 or finish is None:
            job.stream.finish()

    @staticmethod
    def _push(run: _Run, item: Any) -> None:
        try:
            run.job.stream.push(item)
        except Exception:  # the reader left; the next step releases the run
            pass

    def _fail_all(self, exc: BaseException) -> None:
        for run in list(self.runs):
            run.job.stream.finish(exc)
        self.runs.clear()

    def close(self, error: BaseException | None = None) -> None:
        """End every request, as the real scheduler does when its model is unloaded (with ``error``)."""
        for run in self.runs:
            run.job.stream.finish(error)
        self.runs.clear()
        while self.waiting:
            self.waiting.popleft().stream.finish(error)


class FakeEmbeddingBackend:
    """Deterministic unit vectors: the same text always gives the same vector, of the model's size."""

    def __init__(self, model_id: str, script: EmbeddingScript, *, n_ctx: int = 512,
                 dimensions: int = DEFAULT_EMBEDDING_SIZE) -> None:
        self.model_id = model_id
        self.script = script
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.dimensions = dimensions

    @property
    def n_embd(self) -> int:
        """The vector size (the script may override the model's)."""
        return self.script.dimensions or self.dimensions

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        for text in texts:
            rule = self.script.match(text, self.model_id)
            if rule is not None and rule.error is not None:
                raise rule.error
            if rule is not None and rule.delay:
                time.sleep(rule.delay)
        vectors = [unit_vector(text, self.n_embd) for text in texts]
        return vectors, sum(len(self.tokenize(t)) for t in texts)

    def close(self) -> None:
        pass


def unit_vector(text: str, size: int) -> list[float]:
    """A vector of norm 1 drawn from a generator seeded by the text's sha256."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(size)
    return (vector / (math.sqrt(float(vector @ vector)) or 1.0)).astype(np.float32).tolist()
