"""polargrid-sdk's own types, extended only where the wire format has a field the SDK type lacks.

Each class here subclasses the SDK's, so ``isinstance(chunk, polargrid.types.ChatCompletionChunk)`` holds.
"""
from __future__ import annotations

from polargrid import types as sdk
from pydantic import BaseModel


class ChatCompletionChunk(sdk.ChatCompletionChunk):
    """A streamed chat chunk; the last one carries ``usage`` when ``stream_options.include_usage`` is set."""

    usage: sdk.TokenUsage | None = None


class CompletionChunk(sdk.CompletionChunk):
    """A streamed completion chunk; the last one carries ``usage`` when asked for."""

    usage: sdk.TokenUsage | None = None


class ModelMemory(BaseModel):
    """Memory a loaded model holds: the estimate made before loading, and what NVML measured on the GPU."""

    model: str
    estimated_mb: int
    estimated_gpu_mb: int
    measured_gpu_mb: int


class GPUStatusResponse(sdk.GPUStatusResponse):
    """The SDK's GPU status, plus which loaded model holds how much memory."""

    models: list[ModelMemory] = []
