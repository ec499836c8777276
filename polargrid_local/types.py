"""polargrid-sdk's own types, extended only where the wire format has a field the SDK type lacks.

Each class here subclasses the SDK's, so ``isinstance(chunk, polargrid.types.ChatCompletionChunk)`` holds.
"""
from __future__ import annotations

import uuid
from typing import Literal

from polargrid import types as sdk
from pydantic import BaseModel, SerializeAsAny


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style: ``chatcmpl-``, ``cmpl-``, ``call-`` and so on, then 24 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt: ``cached_tokens`` were not processed again (the prompt cache)."""

    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    """OpenAI's ``usage.completion_tokens_details``, as speculative decoding fills it: of the tokens drafted for
    this answer, how many the model accepted (they are part of the answer) and how many it rejected."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class TokenUsage(sdk.TokenUsage):
    """The SDK's token counts, plus OpenAI's ``prompt_tokens_details`` and ``completion_tokens_details``."""

    prompt_tokens_details: PromptTokensDetails | None = None
    completion_tokens_details: CompletionTokensDetails | None = None


class PGMetadata(sdk.PGMetadata):
    """The SDK's metadata, plus where the cached part of the prompt came from: "memory" (a sequence of this
    process already held it) or "disk" (the prompt cache); None when the whole prompt was processed."""

    prompt_cache: Literal["memory", "disk"] | None = None


class ChatCompletionChunk(sdk.ChatCompletionChunk):
    """A streamed chat chunk; the last one carries ``usage`` when ``stream_options.include_usage`` is set."""

    usage: SerializeAsAny[TokenUsage | sdk.TokenUsage] | None = None


class CompletionChunk(sdk.CompletionChunk):
    """A streamed completion chunk; the last one carries ``usage`` when asked for."""

    usage: SerializeAsAny[TokenUsage | sdk.TokenUsage] | None = None


class ChatCompletionResponse(sdk.ChatCompletionResponse):
    """The SDK's chat response; its usage and pg_metadata may carry the local extras above."""

    usage: SerializeAsAny[TokenUsage | sdk.TokenUsage]   # a dict (a cassette, a remote's JSON) keeps its extras
    pg_metadata: SerializeAsAny[PGMetadata | sdk.PGMetadata] | None = None


class CompletionResponse(sdk.CompletionResponse):
    """The SDK's completion response; its usage and pg_metadata may carry the local extras above."""

    usage: SerializeAsAny[TokenUsage | sdk.TokenUsage]   # a dict (a cassette, a remote's JSON) keeps its extras
    pg_metadata: SerializeAsAny[PGMetadata | sdk.PGMetadata] | None = None


class ModelMemory(BaseModel):
    """Memory a loaded model holds: the estimate made before loading, and what NVML measured on the GPU."""

    model: str
    estimated_mb: int
    estimated_gpu_mb: int
    measured_gpu_mb: int


class GPUStatusResponse(sdk.GPUStatusResponse):
    """The SDK's GPU status, plus which loaded model holds how much memory."""

    models: list[ModelMemory] = []


class SpeculativeStats(BaseModel):
    """A chat model's speculative decoding since it loaded: tokens drafted, and how many the model accepted."""

    mode: str                  # "prompt-lookup", or "off"
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    acceptance_rate: float | None = None   # accepted / drafted; None before any draft


class LoadedModel(BaseModel):
    """A loaded model's lifecycle: memory (the estimate made before loading), last use and keep_alive left;
    a chat model served here also its speculative decoding counts."""

    model: str
    kind: str
    memory_mb: int
    last_used: str                     # ISO 8601, UTC: when its last request ended (or it loaded)
    keep_alive_s: float | None = None  # None: stays loaded until unloaded
    expires_in_s: float | None = None  # None: never; while requests are in flight, the full keep_alive
    in_flight: int = 0
    speculative: SpeculativeStats | None = None


class RemoteInfo(BaseModel):
    """Where a remote model runs and whether it answers: 'up', 'down', 'offline' (under the offline guard), or
    'unknown' until the first background probe of its server has ended."""

    base_url: str
    model: str
    status: str


class ModelInfo(sdk.ModelInfo):
    """The SDK's model info; a remote model also carries ``pg_remote``."""

    pg_remote: RemoteInfo | None = None


class ListModelsResponse(sdk.ListModelsResponse):
    data: list[ModelInfo]


class CachedPrompt(BaseModel):
    """A prompt processed ahead of time and kept in the prompt cache (``cache_prompt``)."""

    object: Literal["prompt_cache.entry"] = "prompt_cache.entry"
    model: str
    key: str            # the entry's file name, without its suffix (what `polargrid-local cache rm` takes)
    tokens: int         # tokens whose KV state is saved
    bytes: int          # the file's size
    pinned: bool = True


class PromptCacheEntry(BaseModel):
    """One saved prompt prefix."""

    key: str
    model: str
    tokens: int
    bytes: int
    pinned: bool
    last_used: str      # ISO 8601, UTC


class PromptCacheStatus(BaseModel):
    """The prompt cache on disk: where, its budget and use, what it holds, and this process's counters per model
    (lookups, disk_hits, memory_hits, misses, restored_tokens, saves, saved_bytes, save_failures, ...)."""

    directory: str
    max_bytes: int
    used_bytes: int
    min_tokens: int
    entries: list[PromptCacheEntry] = []
    stats: dict[str, dict[str, int]] = {}


class ModelStatusResponse(sdk.ModelStatusResponse):
    """The SDK's model status, plus each loaded model's memory, last use and keep_alive, each remote
    model's reachability, and the prompt cache (None when it is off)."""

    models: list[LoadedModel] = []
    remote: dict[str, str] = {}
    prompt_cache: PromptCacheStatus | None = None


class HealthResponse(sdk.HealthResponse):
    """The SDK's health answer, plus each remote model as 'up', 'down', 'offline' or 'unknown' (none of them
    fails it; each is the last background probe's answer, so health never waits on a remote)."""

    remotes: dict[str, str] = {}
