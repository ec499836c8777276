"""Fake chat and embedding backends: what llm/requests.py and the worker's batching path expect of a model.

The fake chat model is a Decoder (llm/decoder.py) whose tokens come from the script, driven by the real
BatchScheduler: requests go through the same worker admission, queue limit (RateLimitError), slots,
Started/TextDelta events, stop matching and budgets (max_tokens and n_ctx) as with llama.cpp.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import numpy as np
from polargrid import errors as sdk

from ..llm.batching import BatchScheduler
from .schema import SchemaGenerationError, example_for
from .script import ChatScript, EmbeddingScript, Rule
from .tokens import EOS, FakeTokenizer, parse_chat, pieces, render_chat

DEFAULT_EMBEDDING_SIZE = 384  # all-MiniLM-L6-v2's, the default embedding model's


class ScriptError(sdk.ServerError):
    """The script asks for something the request rules out (a reply that breaks its JSON schema)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"fake script: {message}", 500)


@dataclass
class _Reply:
    """What the fake model will write for one request: the sampler the scheduler holds for its sequence.

    Each scripted piece is the tokens of its text, sampled together (so it streams as one chunk and a
    budget can end inside it); then the end token. Pacing (``delay`` between pieces, a ``stall``) and a
    fault ``after`` n pieces happen between pieces.
    """

    pieces: list[list[int]]
    delay: float = 0.0
    error: BaseException | None = None
    error_after: int | None = None
    stall: float | None = None
    stall_after: int = 0
    next_at: float = 0.0
    piece: int = 0          # pieces given

    def next_tokens(self, now: float) -> list[int]:
        """The next piece's tokens, or none while paced or stalled; raises the scripted fault when it is due."""
        if now < self.next_at:
            return []
        if self.stall is not None and self.piece == self.stall_after:
            self.next_at, self.stall = now + self.stall, None
            return []
        if self.error is not None and self.piece == self.error_after:
            raise self.error
        if self.piece >= len(self.pieces):
            return [EOS]
        tokens = self.pieces[self.piece]
        self.piece += 1
        self.next_at = now + self.delay
        return tokens


class ScriptedDecoder:
    """The Decoder of a fake chat model: no computation; each sequence's tokens come from the script."""

    verifies = False   # a scripted piece is several tokens at once: nothing to verify drafts against

    def __init__(self, backend: FakeChatBackend) -> None:
        self.backend = backend

    def decode(self, entries: Any) -> None:
        pass

    def sampler(self, params: Any, tokens: Sequence[int]) -> _Reply:
        return self.backend.answer(params, tokens)

    def sample(self, sampler: _Reply, index: int) -> list[int]:
        return sampler.next_tokens(time.monotonic())

    def free_sampler(self, sampler: Any) -> None:
        pass

    def logprobs(self, index: int, tokens: Sequence[int]) -> list[float]:
        """A fake model has no opinion: every token equally likely."""
        return [-math.log(max(1, len(tokens)))] * len(tokens)

    def is_end(self, token: int) -> bool:
        return token == EOS

    def piece(self, token: int) -> bytes:
        return self.backend.tokenizer.text_of(token).encode("utf-8")

    def truncate(self, seq_id: int, start: int) -> bool:
        return True

    def clear(self, seq_id: int) -> None:
        pass

    def copy(self, source: int, target: int) -> None:
        pass

    def save_sequence(self, seq_id: int, into: Any = None) -> Any:
        return None   # no cells to save: the fake has no prompt cache

    def load_sequence(self, seq_id: int, data: Any) -> bool:
        return False

    def logits(self, index: int) -> Any:
        return None

    def sample_logits(self, sampler: Any, logits: Any) -> list[int]:
        raise NotImplementedError("the fake chat model has no logits")

    def close(self) -> None:
        pass


class FakeChatBackend:
    """A chat model answering from a ChatScript, with a deterministic tokenizer and ChatML template. Its
    requests run through the real BatchScheduler (slots, queueing, stops, budgets, release)."""

    chat_template = "chatml (polargrid_local fake)"
    template_mentions_tools = False

    def __init__(self, model_id: str, script: ChatScript, *, n_ctx: int = 2048, n_parallel: int = 8,
                 max_queue: int = 64, n_batch: int = 512) -> None:
        self.model_id = model_id
        self.script = script
        self.tokenizer = FakeTokenizer()
        self.n_ctx = n_ctx
        self.n_parallel = max(1, n_parallel)
        self.max_queue = max_queue
        self.scheduler = BatchScheduler(ScriptedDecoder(self), n_parallel=self.n_parallel, n_ctx_per_seq=n_ctx,
                                        n_batch=n_batch)

    @property
    def tokens_generated(self) -> int:
        return self.scheduler.tokens_generated

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.tokenizer.tokenize(text, add_bos=add_bos, special=special)

    def render_chat(self, messages: list[dict[str, Any]], tools: Any = None) -> str:
        return render_chat(messages)

    def add_bos_for_template(self, prompt: str) -> bool:
        return True

    def answer(self, params: Any, tokens: Sequence[int]) -> _Reply:
        """Decide the reply for one prompt: the matching rule, or the fake's own answer."""
        prompt = self.tokenizer.detokenize(tokens)
        messages = parse_chat(prompt)
        text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "") if messages else prompt
        grammar = params.grammar
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
        if not rule.chunked:   # token by token, as a model streams
            replies = pieces("".join(replies))
        encoded = [self.tokenizer.tokenize(piece, add_bos=False, special=False) for piece in replies]
        return _Reply(encoded, delay=rule.delay, error=rule.error, error_after=rule.after, stall=rule.stall,
                      stall_after=rule.after or 0)

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
