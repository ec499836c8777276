"""Embedding requests: OpenAI's options (``dimensions``, ``encoding_format``) and the job a worker runs."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
from polargrid.types import EmbeddingRequest

from ..errors import invalid
from ..runtime.interfaces import Job, JobContext
from .backend import LlamaBackend

ENCODINGS = ("float", "base64")
# OpenAI's embedding options that polargrid's EmbeddingRequest has no field for: taken from a
# request dict (or keyword arguments) before it is validated as the SDK's type.
LOCAL_OPTIONS = ("dimensions", "encoding_format")


@dataclasses.dataclass(frozen=True)
class EmbeddingPlan:
    """What to embed and how to shape the vectors.

    ``encoding_format`` only changes the HTTP body: "base64" sends each vector as the bytes of
    little-endian float32s. In process both encodings give the same floats (float32 values,
    what the openai client decodes base64 back into).
    """

    texts: list[str]
    dimensions: int | None = None
    encoding_format: str = "float"


def split_options(request: EmbeddingRequest | dict[str, Any], options: dict[str, Any]
                  ) -> tuple[EmbeddingRequest | dict[str, Any], dict[str, Any]]:
    """Separate OpenAI's options from a request dict; keyword arguments win over dict keys."""
    if not isinstance(request, dict):
        return request, dict(options)
    request = dict(request)
    found = {key: request.pop(key) for key in LOCAL_OPTIONS if key in request}
    found.update({k: v for k, v in options.items() if v is not None})
    return request, found


def plan_embeddings(texts: list[str], options: dict[str, Any]) -> EmbeddingPlan:
    """The inputs (checked by requests.embedding_inputs) and OpenAI's options, checked where no model is needed."""
    encoding = options.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise invalid(f"encoding_format must be 'float' or 'base64', not {encoding!r}", field="encoding_format")
    dimensions = options.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1):
        raise invalid(f"dimensions must be a positive integer, not {dimensions!r}", field="dimensions")
    return EmbeddingPlan(texts, dimensions, encoding)


def shorten(vectors: list[list[float]], dimensions: int) -> list[list[float]]:
    """The first ``dimensions`` components of each vector, scaled back to unit length (as OpenAI does)."""
    out = []
    for vector in vectors:
        head = np.asarray(vector[:dimensions], dtype=np.float32)
        norm = float(np.linalg.norm(head))
        out.append((head / norm if norm > 0 else head).tolist())
    return out


def embedding_job(plan: EmbeddingPlan, model_id: str, batch: int = 16) -> Job:
    """What a worker runs: one vector per input in order, and the tokens read. It embeds ``batch``
    inputs per llama.cpp call, so an unload or a time limit stops a long request between calls."""

    def run(backend: LlamaBackend, ctx: JobContext) -> Iterator[tuple[list[list[float]], int]]:
        if plan.dimensions is not None and plan.dimensions > backend.n_embd:
            raise invalid(f"dimensions must be at most {backend.n_embd} for model {model_id!r} "
                          f"(its vectors have {backend.n_embd}); got {plan.dimensions}", field="dimensions")
        for i, text in enumerate(plan.texts):
            n = len(backend.tokenize(text))
            if n > backend.n_ctx:
                raise invalid(f"input[{i}] is {n} tokens; model {model_id!r} embeds at most {backend.n_ctx}",
                              field="input")
        vectors: list[list[float]] = []
        count = 0
        for start in range(0, len(plan.texts), max(1, batch)):
            if ctx.cancelled:
                return
            part, n = backend.embed(plan.texts[start:start + batch])
            vectors += part
            count += n
        if plan.dimensions is not None and plan.dimensions < backend.n_embd:
            vectors = shorten(vectors, plan.dimensions)
        yield vectors, count

    return Job(run)
