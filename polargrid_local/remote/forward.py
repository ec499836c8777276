"""A request as a remote OpenAI-compatible server takes it, and readers that turn its replies into the SDK's types.

Calls (llm/calls.py, speech/calls.py) prepare a ``Forward`` for a remote model; the model's RemoteWorker
sends it (the remote's own model name filled in) and its reader reads the reply: server-sent events
(``events``), raw bytes as they arrive (``bytes``), or the whole body once (``body``).
"""
from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydantic
from polargrid import errors as sdk
from polargrid.types import TokenUsage

from ..types import new_id


@dataclass
class Forward:
    """What a remote worker sends: ``path`` under the remote's base URL, a JSON ``body`` or a multipart
    ``form`` and ``files``, and how the reply is read. The worker sets the body's (or form's) ``model``."""

    path: str
    body: dict[str, Any] | None = None
    form: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    reply: Literal["events", "bytes", "body"] = "events"
    where: str = "remote"   # set by the worker that sends it: "<model id> at <host:port>", for messages


def forwarded_fields(request: pydantic.BaseModel) -> dict[str, Any]:
    """The fields the caller set: the remote's defaults apply to the rest."""
    return request.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def usage_of(raw: Any) -> TokenUsage | None:
    """A remote's usage object, or None when it sent none."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = int(raw.get("prompt_tokens") or 0), int(raw.get("completion_tokens") or 0)
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=int(raw.get("total_tokens") or prompt + completion))


class ChunkRelay:
    """Remote SSE payloads as the SDK's chunk type, under the model name the caller asked for.

    Plays the chunker's part for the folds: ``id``, ``created``, ``model`` and ``usage``.
    """

    def __init__(self, chunk_type: type[pydantic.BaseModel], model: str, include_usage: bool, prefix: str,
                 forward: Forward) -> None:
        self.chunk_type, self.model, self.include_usage, self.forward = chunk_type, model, include_usage, forward
        self.id = new_id(prefix)
        self.created = int(time.time())
        self.usage: TokenUsage | None = None
        self._first = True

    def feed(self, payload: dict[str, Any]) -> list[Any]:
        usage = usage_of(payload.get("usage"))
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
            raise sdk.ServerError(f"remote {self.forward.where} sent a chunk that is not OpenAI-compatible: "
                                  f"{exc.errors()[0].get('msg')}", 502) from exc

    def tokens(self) -> int:
        return self.usage.total_tokens if self.usage else 0


def json_object(body: bytes, forward: Forward) -> dict[str, Any]:
    """A reply body that must be a JSON object (a 502 naming the remote otherwise)."""
    import json

    try:
        parsed = json.loads(body)
    except ValueError:
        raise sdk.ServerError(f"remote {forward.where} answered {forward.path} with something other than JSON",
                              502) from None
    if not isinstance(parsed, dict):
        raise sdk.ServerError(f"remote {forward.where} answered {forward.path} with JSON that is not an object",
                              502)
    return parsed


class EmbeddingsReply:
    """A remote's embeddings answer as ``(vectors, usage)``: the same item a local embedding job's reader gives."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.usage: TokenUsage | None = None

    def feed(self, body: bytes) -> list[tuple[list[list[float]], TokenUsage]]:
        data = json_object(body, self.forward)
        try:
            items = sorted(data["data"], key=lambda item: item.get("index", 0))
            vectors = [_vector(item["embedding"]) for item in items]
        except (KeyError, TypeError, ValueError) as exc:
            raise sdk.ServerError(f"remote {self.forward.where} answered embeddings without vectors: {exc}",
                                  502) from exc
        self.usage = usage_of(data.get("usage")) or TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        return [(vectors, self.usage)]

    def tokens(self) -> int:
        return self.usage.total_tokens if self.usage else 0


def _vector(value: Any) -> list[float]:
    if isinstance(value, str):  # a server that ignored encoding_format=float
        return np.frombuffer(base64.b64decode(value), "<f4").astype(float).tolist()
    return [float(x) for x in value]
