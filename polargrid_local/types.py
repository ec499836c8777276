"""polargrid-sdk's own types, extended only where the wire format has a field the SDK type lacks.

Each class here subclasses the SDK's, so ``isinstance(chunk, polargrid.types.ChatCompletionChunk)`` holds.
"""
from __future__ import annotations

import uuid

from polargrid import types as sdk
from pydantic import BaseModel, SerializeAsAny


def new_id(prefix: str) -> str:
    """A response id in OpenAI's style: ``chatcmpl-``, ``cmpl-``, ``call-`` and so on, then 24 hex digits."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionTokensDetails(BaseModel):
    """OpenAI's ``usage.completion_tokens_details``, as speculative decoding fills it: of the tokens drafted for
    this answer, how many the model accepted (they are part of the answer) and how many it rejected."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class TokenUsage(sdk.TokenUsage):
    """The SDK's token usage, plus ``completion_tokens_details`` for a model served in this process."""

    completion_tokens_details: CompletionTokensDetails | None = None


class ChatCompletionChunk(sdk.ChatCompletionChunk):
    """A streamed chat chunk; the last one carries ``usage`` when ``stream_options.include_usage`` is set."""

    usage: SerializeAsAny[sdk.TokenUsage] | None = None


class CompletionChunk(sdk.CompletionChunk):
    """A streamed completion chunk; the last one carries ``usage`` when asked for."""

    usage: SerializeAsAny[sdk.TokenUsage] | None = None


class ChatCompletionResponse(sdk.ChatCompletionResponse):
    """The SDK's chat response; its usage may be the local TokenUsage (with draft counts)."""

    usage: SerializeAsAny[sdk.TokenUsage]


class CompletionResponse(sdk.CompletionResponse):
    """The SDK's completion response; its usage may be the local TokenUsage (with draft counts)."""

    usage: SerializeAsAny[sdk.TokenUsage]


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
    """Where a remote model runs and whether it answers ('up', 'down', or 'offline' under the offline guard)."""

    base_url: str
    model: str
    status: str


class ModelInfo(sdk.ModelInfo):
    """The SDK's model info; a remote model also carries ``pg_remote``."""

    pg_remote: RemoteInfo | None = None


class ListModelsResponse(sdk.ListModelsResponse):
    data: list[ModelInfo]


class ModelStatusResponse(sdk.ModelStatusResponse):
    """The SDK's model status, plus each loaded model's memory, last use and keep_alive, and each remote
    model's reachability."""

    models: list[LoadedModel] = []
    remote: dict[str, str] = {}


class HealthResponse(sdk.HealthResponse):
    """The SDK's health answer, plus each remote model as 'up', 'down' or 'offline' (none of them fails it)."""

    remotes: dict[str, str] = {}
