"""A request as a remote OpenAI-compatible server takes it, and readers that turn its replies into the SDK's types.

Calls (llm/calls.py, speech/calls.py) prepare a ``Forward`` for a remote model; the model's RemoteWorker
sends it (the remote's own model name filled in) and its reader reads the reply: server-sent events
(``events``), raw bytes as they arrive (``bytes``), or the whole body once (``body``).
"""
from __future__ import annotations

import base64
import binascii
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pydantic
from polargrid import errors as sdk
from polargrid.types import TokenUsage

from ..types import new_id
from .sse import finite_json


@dataclass
class Forward:
    """What a remote worker sends: ``path`` under the remote's base URL, a JSON ``body`` or a multipart
    ``form`` and ``files``, and how the reply is read. The worker sets the body's (or form's) ``model``."""

    path: str
    body: dict[str, Any] | None = None
    form: dict[str, Any] | None = None
    files: dict[str, Any] | None = None
    reply: Literal["events", "bytes", "body"] = "events"
    expects: tuple[str, ...] = ()   # content types of a good answer (prefixes); () for the reply's usual ones
    # Set by the backend that sends it, from the model's [models.remote]:
    where: str = "remote"           # "<model id> at <host:port>", for messages
    max_chunks: int | None = None   # the most chunks a non-streamed answer collects


def forwarded_fields(request: pydantic.BaseModel) -> dict[str, Any]:
    """The fields the caller set: the remote's defaults apply to the rest."""
    return request.model_dump(mode="json", exclude_unset=True, exclude_none=True)


def usage_of(raw: Any) -> TokenUsage | None:
    """A remote's usage object, or None when it sent none. Counts that are not whole numbers of tokens
    (strings, fractions, negatives, NaN) are taken as missing: usage must never fail an answer."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = _count(raw.get("prompt_tokens")) or 0, _count(raw.get("completion_tokens")) or 0
    total = _count(raw.get("total_tokens"))
    return TokenUsage(prompt_tokens=prompt, completion_tokens=completion,
                      total_tokens=total if total is not None else prompt + completion)


MAX_COUNT = 2 ** 53   # larger counts are no count of tokens (and would not survive a JSON double)


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value <= MAX_COUNT else None


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
            if isinstance(payload.get("id"), str) and payload["id"]:
                self.id = payload["id"]
            created = payload.get("created")
            if isinstance(created, int) and not isinstance(created, bool) and 0 < created < 2 ** 40:
                self.created = created
        payload = {**payload, "id": self.id, "created": self.created, "model": self.model}
        if "usage" in payload:   # as read above: a malformed usage is no usage, never a failed answer
            payload["usage"] = None if usage is None else usage.model_dump()
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

    def check_collected(self, count: int) -> None:
        """A fold collects this answer's chunks: a remote that sends more than its max_chunks gets a 502."""
        if self.forward.max_chunks is not None and count > self.forward.max_chunks:
            raise sdk.ServerError(f"remote {self.forward.where} sent more than {self.forward.max_chunks} chunks "
                                  "for one answer (remote.max_chunks)", 502)


def json_object(body: bytes, forward: Forward) -> dict[str, Any]:
    """A reply body that must be a JSON object (a 502 naming the remote otherwise)."""
    try:
        parsed = finite_json(body)
    except ValueError as exc:
        raise sdk.ServerError(f"remote {forward.where} answered {forward.path} with something other than JSON "
                              f"({str(exc)[:100]})", 502) from None
    if not isinstance(parsed, dict):
        raise sdk.ServerError(f"remote {forward.where} answered {forward.path} with JSON that is not an object",
                              502)
    return parsed


def _index(item: Any) -> int:
    index = item.get("index", 0)
    if isinstance(index, bool) or not isinstance(index, int):
        raise ValueError("an embedding's index is not a whole number")
    return index


class EmbeddingsReply:
    """A remote's embeddings answer as ``(vectors, usage)``: the same item a local embedding job's reader gives."""

    def __init__(self, forward: Forward) -> None:
        self.forward = forward
        self.usage: TokenUsage | None = None

    def feed(self, body: bytes) -> list[tuple[list[list[float]], TokenUsage]]:
        data = json_object(body, self.forward)
        try:
            items = data.get("data")
            if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
                raise ValueError("its data is not a list of embedding objects")
            vectors = [_vector(item["embedding"]) for item in sorted(items, key=_index)]
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise sdk.ServerError(f"remote {self.forward.where} answered embeddings without vectors: {exc}",
                                  502) from exc
        self.usage = usage_of(data.get("usage")) or TokenUsage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        return [(vectors, self.usage)]

    def tokens(self) -> int:
        return self.usage.total_tokens if self.usage else 0


def _vector(value: Any) -> list[float]:
    if isinstance(value, str):  # a server that ignored encoding_format=float
        try:
            vector = np.frombuffer(base64.b64decode(value, validate=True), "<f4").astype(float)
        except binascii.Error as exc:
            raise ValueError(f"an embedding is neither numbers nor base64: {exc}") from None
    else:
        if not isinstance(value, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                  for x in value):
            raise ValueError("an embedding is not a list of finite numbers")
        vector = np.asarray(value, dtype=float)
    if vector.size == 0:
        raise ValueError("an embedding is empty")
    if not np.isfinite(vector).all():
        raise ValueError("an embedding holds NaN or infinite values")
    return vector.tolist()
