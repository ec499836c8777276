"""RemoteService: the engine's requests for remote models, forwarded and answered as the SDK's own types."""
from __future__ import annotations

import base64
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pydantic
from polargrid import errors as sdk
from polargrid.types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    TokenUsage,
)

from ..errors import engine_boundary
from ..llm.chunks import new_id
from ..runtime.stream import Stream
from ..store.registry import ModelSpec
from ..types import ChatCompletionChunk, CompletionChunk
from .backend import RemoteBackend

if TYPE_CHECKING:
    from ..engine import LocalEngine

PROBE_TTL = 5.0  # seconds a reachability answer is reused


def _usage(raw: Any) -> TokenUsage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0)
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=int(raw.get("total_tokens") or prompt + completion))


class ChunkRelay:
    """Remote SSE payloads as the SDK's chunk type, under the model name the caller asked for.

    Plays the chunker's part for the folds: ``id``, ``created``, ``model`` and ``usage``.
    """

    def __init__(self, chunk_type: type[pydantic.BaseModel], model: str, include_usage: bool, where: str,
                 prefix: str) -> None:
        self.chunk_type, self.model, self.include_usage, self.where = chunk_type, model, include_usage, where
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.usage: TokenUsage | None = None
        self._first = True

    def feed(self, payload: dict[str, Any]) -> list[Any]:
        usage = _usage(payload.get("usage"))
        if usage is not None:
            self.usage = usage
        if self._first:
            self._first = False
            self.id = payload.get("id") or self.id
            self.created = payload.get("created") or self.created
        payload = {**payload, "model": self.model}
        if not self.include_usage:
            payload.pop("usage", None)
        if not payload.get("choices") and not payload.get("usage"):
            return []
        try:
            return [self.chunk_type.model_validate(payload)]
        except pydantic.ValidationError as exc:
            raise sdk.ServerError(f"remote {self.where} sent a chunk that is not OpenAI-compatible: "
                                  f"{exc.errors()[0].get('msg')}", 502) from exc


def _forwarded(request: pydantic.BaseModel, spec: ModelSpec) -> dict[str, Any]:
    """The fields the caller set, under the remote's model name: the remote's defaults apply to the rest."""
    body = request.model_dump(mode="json", exclude_unset=True, exclude_none=True)
    body["model"] = spec.remote.model
    return body


class RemoteService:
    """Chat, completions and embeddings on remote models; reachability probes for status and health."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine
        self._probes: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def _worker(self, spec: ModelSpec):
        with engine_boundary("remote model"):
            return self.engine.pool.worker(spec)

    def chat_stream(self, spec: ModelSpec, request: ChatCompletionRequest, include_usage: bool) -> Stream[Any]:
        body = _forwarded(request, spec)
        return self.engine.pool.tracked(spec, lambda: self._relay(spec, "chat/completions", body, ChunkRelay(
            ChatCompletionChunk, request.model, include_usage, spec.id, "chatcmpl")))

    def completion_stream(self, spec: ModelSpec, request: CompletionRequest, include_usage: bool,
                          seed: int | None, extras: dict[str, Any] | None = None) -> Stream[Any]:
        """``extras``: sampling fields beyond the SDK's completion request (min_p, repetition_penalty),
        forwarded as the OpenAI-compatible servers (vLLM, llama.cpp, ours) take them."""
        body = {**_forwarded(request, spec), **(extras or {})}
        if seed is not None:
            body["seed"] = seed
        return self.engine.pool.tracked(spec, lambda: self._relay(spec, "completions", body, ChunkRelay(
            CompletionChunk, request.model, include_usage, spec.id, "cmpl")))

    def _relay(self, spec: ModelSpec, path: str, body: dict[str, Any], relay: ChunkRelay) -> Stream[Any]:
        """Send now (so refusals are raised here, where fallback can act); the stream's reader reads the rest."""
        worker, load_seconds = self._worker(spec)
        backend: RemoteBackend = worker.backend
        relay.where = backend.where
        body.update(stream=True, stream_options={"include_usage": True})
        sent = time.perf_counter()
        response = backend.send("POST", path, json=body)
        results, ctx = worker.read(backend.payloads(response))
        ctx.submitted_at = sent

        def finished(stream: Stream[Any]) -> None:
            tokens = relay.usage.total_tokens if relay.usage else 0
            self.engine.usage.record(spec.id, tokens, stream.metadata().latency_ms or 0)

        stream = Stream(results, ctx, relay.feed, load_seconds, on_finish=finished)
        stream.region = backend.region
        stream.chunker = relay
        return stream

    def embeddings(self, spec: ModelSpec, request: EmbeddingRequest) -> EmbeddingResponse:
        with self.engine.pool.in_use(spec):
            worker, _ = self._worker(spec)
            backend: RemoteBackend = worker.backend
            data = backend.json("embeddings", {**_forwarded(request, spec), "encoding_format": "float"})
        try:
            items = sorted(data["data"], key=lambda item: item.get("index", 0))
            vectors = [_vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise sdk.ServerError(f"remote {backend.where} answered embeddings without vectors: {exc}", 502) from exc
        usage = _usage(data.get("usage")) or TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        self.engine.usage.record(spec.id, usage.total_tokens)
        return EmbeddingResponse(data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
                                 model=request.model, usage=usage)

    # -- reachability ------------------------------------------------------------------------

    def reachability(self, spec: ModelSpec) -> str:
        """'up', 'down' or 'offline' for a remote model, from a probe at most PROBE_TTL seconds old."""
        if getattr(self.engine, "fake", None) is not None:
            return "up"   # a fake engine answers remote entries itself; nothing is probed
        key = spec.remote.base_url
        with self._lock:
            cached = self._probes.get(key)
        if cached is not None and time.monotonic() - cached[0] < PROBE_TTL:
            return cached[1]
        backend = RemoteBackend(spec)
        try:
            state = backend.probe()
        finally:
            backend.close()
        with self._lock:
            self._probes[key] = (time.monotonic(), state)
        return state


def _vector(value: Any) -> list[float]:
    if isinstance(value, str):  # a server that ignored encoding_format=float
        return np.frombuffer(base64.b64decode(value), "<f4").astype(float).tolist()
    return [float(x) for x in value]
