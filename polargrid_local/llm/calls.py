"""Text requests as calls (runtime/interfaces.py): prepared for a model in this process, or forwarded to a remote.

Local: the request is checked and planned (sampling, grammar, tools) without a model, then runs as a job on
the model's worker; its events become the SDK's chunks through a chunker. Remote: the fields the caller set
go to the remote server under its own model name; its events become the same chunks through a relay. Either
way the stream folds into the same response.
"""
from __future__ import annotations

from typing import Any

from polargrid.types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    TokenUsage,
)

from ..errors import invalid
from ..limits import Limits
from ..remote.forward import ChunkRelay, EmbeddingsReply, Forward, forwarded_fields
from ..runtime.interfaces import Prepared
from ..types import ChatCompletionChunk, CompletionChunk
from .chunks import ChatChunker, CompletionChunker, fold_chat, fold_completion
from .embeddings import EmbeddingPlan, embedding_job, shorten
from .requests import chat_job, check_stops, completion_job, plan_chat, sampling_for


def _tokens(reader: Any):
    return lambda: reader.usage.total_tokens if reader.usage else 0


class ChatCall:
    """A chat completion; ``include_usage`` adds the final usage chunk to its stream; ``speculative`` False
    turns drafting off for it (a local extra, never forwarded)."""

    what = "chat"

    def __init__(self, request: ChatCompletionRequest, include_usage: bool, limits: Limits, pin: Any = None,
                 speculative: bool | None = None) -> None:
        """``pin``: cache_prompt's Future, resolved with the prompt cache entry of this prompt, pinned."""
        self.request, self.include_usage, self.limits, self.pin = request, include_usage, limits, pin
        self.speculative = speculative

    def local(self, model_id: str) -> Prepared:
        plan = plan_chat(self.request, model_id, self.limits, self.speculative)
        chunker = ChatChunker(self.request.model, self.request.tools, plan.tools, self.include_usage, plan.output)
        return Prepared(chat_job(plan, model_id, self.pin), chunker, _fold(fold_chat, chunker), _tokens(chunker))

    def remote(self) -> Prepared:
        if self.pin is not None:
            raise invalid("the prompt cache keeps prompts of models served in this process, not remote ones")
        forward = Forward("chat/completions", forwarded_fields(self.request))
        relay = ChunkRelay(ChatCompletionChunk, self.request.model, self.include_usage, "chatcmpl", forward)
        return Prepared(forward, relay, _fold(fold_chat, relay), relay.tokens)


class CompletionCall:
    """A text completion: one choice per prompt. ``seed`` and ``extras`` (min_p, repetition_penalty) are the
    sampling fields the SDK's completion request lacks, taken from a request dict."""

    what = "completion"

    def __init__(self, request: CompletionRequest, prompts: list[str], include_usage: bool, seed: int | None,
                 extras: dict[str, Any], pin: Any = None, speculative: bool | None = None) -> None:
        self.request, self.prompts, self.include_usage = request, prompts, include_usage
        self.seed, self.extras, self.pin, self.speculative = seed, extras, pin, speculative

    def local(self, model_id: str) -> Prepared:
        chunker = CompletionChunker(self.request.model, self.include_usage)
        chunker.prompts_total = len(self.prompts)
        params = sampling_for(self.request, seed=self.seed, speculative=self.speculative, **self.extras)
        job = completion_job(self.prompts, params, self.request.max_tokens or 100, check_stops(self.request.stop),
                             model_id, self.pin)
        return Prepared(job, chunker, _fold(fold_completion, chunker), _tokens(chunker))

    def remote(self) -> Prepared:
        if self.pin is not None:
            raise invalid("the prompt cache keeps prompts of models served in this process, not remote ones")
        body = {**forwarded_fields(self.request), **self.extras}
        if self.seed is not None:
            body["seed"] = self.seed
        forward = Forward("completions", body)
        relay = ChunkRelay(CompletionChunk, self.request.model, self.include_usage, "cmpl", forward)
        return Prepared(forward, relay, _fold(fold_completion, relay), relay.tokens)


def _fold(fold: Any, reader: Any):
    return lambda items, metadata: fold(items, reader, metadata)


class _LocalVectors:
    """A local embedding job's ``(vectors, count)`` as ``(vectors, usage)``, the remote reader's item."""

    def __init__(self) -> None:
        self.usage: TokenUsage | None = None

    def feed(self, item: tuple[list[list[float]], int]) -> list[tuple[list[list[float]], TokenUsage]]:
        vectors, count = item
        self.usage = TokenUsage(prompt_tokens=count, completion_tokens=0, total_tokens=count)
        return [(vectors, self.usage)]


class EmbeddingCall:
    """Embeddings of one or more strings, with OpenAI's ``dimensions`` (vectors cut and renormalised)."""

    what = "embedding"

    def __init__(self, request: EmbeddingRequest, plan: EmbeddingPlan, batch: int) -> None:
        self.request, self.plan, self.batch = request, plan, batch

    def local(self, model_id: str) -> Prepared:
        reader = _LocalVectors()
        return Prepared(embedding_job(self.plan, model_id, self.batch), reader, self._fold, _tokens(reader))

    def remote(self) -> Prepared:
        forward = Forward("embeddings", {**forwarded_fields(self.request), "encoding_format": "float"}, reply="body")
        reader = EmbeddingsReply(forward)
        return Prepared(forward, reader, self._fold, reader.tokens)

    def _fold(self, items: list[tuple[list[list[float]], TokenUsage]], metadata: Any) -> EmbeddingResponse:
        vectors, usage = items[0]
        if self.plan.dimensions is not None and any(len(v) > self.plan.dimensions for v in vectors):
            vectors = shorten(vectors, self.plan.dimensions)   # a remote's vectors, cut as the local models answer
        return EmbeddingResponse(data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
                                 model=self.request.model, usage=usage)
