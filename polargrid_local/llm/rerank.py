"""Rerank: documents ordered by how well they answer a query, in Cohere's and Jina's request and response shape.

The request's ``model`` picks the method:

- a chat model, or the alias ``rerank-1`` (the default chat model, unless ``[defaults] rerank`` names another
  chat, embedding or rerank model): the model judges each document. Its prompt asks whether the document answers the
  query; the score is P(yes) / (P(yes) + P(no)) for its next token, read from one forward pass over the
  prompt (no token is generated). The documents' prompts run as one batch on the model's scheduler and
  share the query's prefix in the KV cache.
- an embedding model: cosine similarity between the query's vector and each document's.
- a ``rerank`` entry of models.toml: a cross-encoder GGUF scored by llama.cpp's rank pooling (cross_encoder.py).
"""
from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from pydantic import BaseModel

from ..errors import NotFoundError, check_text, invalid
from ..limits import Limits
from ..runtime.compute import on_lane
from ..runtime.interfaces import Job, JobContext, Prepared
from ..store.registry import ModelSpec, Registry
from .batching import Probed, PromptJob
from .decoder import log_probs
from .generation import SamplingParams
from .requests import fit_prompt

RERANK_ALIASES = ("rerank-1", "rerank")
JUDGE_SYSTEM = ("You judge search results. Given a query and a document, answer Yes if the document answers "
                "the query or is directly about what it asks, and No otherwise. Answer with one word: Yes or No.")
YES = ("Yes", "yes", " Yes", " yes", "YES")
NO = ("No", "no", " No", " no", "NO")
GREEDY = SamplingParams(temperature=0.0)  # a probe samples nothing; its slot still gets a sampler


class RerankResult(BaseModel):
    """One document's place: its index in the request, its score (higher is more relevant) and, if asked, its text."""

    index: int
    relevance_score: float
    document: dict[str, str] | None = None


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    """Results sorted by relevance_score, best first (``top_n`` of them), and the tokens the scoring read."""

    id: str
    object: str = "list"
    model: str
    method: str                       # "judge", "cosine" or "cross-encoder"
    results: list[RerankResult]
    usage: RerankUsage


def _check(request: Any, max_documents: int) -> tuple[str | None, str, list[str], int | None, bool]:
    if not isinstance(request, dict):
        raise invalid("a rerank request must be an object with query and documents")
    unknown = sorted(set(request) - {"model", "query", "documents", "top_n", "return_documents", "rank_fields",
                                     "max_chunks_per_doc"})
    if unknown:
        raise invalid(f"unknown rerank parameter(s): {', '.join(unknown)}", field=unknown[0])
    model, query, documents = request.get("model"), request.get("query"), request.get("documents")
    if model is not None and not isinstance(model, str):
        raise invalid("model must be a string", field="model")
    if not isinstance(query, str) or not query.strip():
        raise invalid("query must be a non-empty string", field="query")
    if not isinstance(documents, list) or not documents:
        raise invalid("documents must be a non-empty list of strings (or of {'text': ...} objects)", field="documents")
    if len(documents) > max_documents:
        raise invalid(f"documents has {len(documents)} entries; at most {max_documents} per request "
                      "(the max_embedding_inputs limit)", field="documents", limit="max_embedding_inputs")
    texts = []
    for i, doc in enumerate(documents):
        text = doc.get("text") if isinstance(doc, dict) else doc
        if not isinstance(text, str) or not text:
            raise invalid(f"documents[{i}] must be a non-empty string or {{'text': '...'}}", field=f"documents[{i}]")
        texts.append(text)
    check_text([query, *texts], "documents")
    top_n = request.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise invalid("top_n must be a positive integer", field="top_n")
    keep = request.get("return_documents", True)
    if not isinstance(keep, bool):
        raise invalid("return_documents must be true or false", field="return_documents")
    return model, query, texts, top_n, keep


class Reranker:
    """Rerank requests, scored with the models' own calls: ``open(spec, call)`` runs a scoring job on a model
    (the engine's one way to run work), ``embeddings(request)`` gives vectors for cosine; ``limits()`` the bounds."""

    def __init__(self, registry: Registry, limits: Callable[[], Limits], open: Callable[[ModelSpec, Any], Any],
                 embeddings: Callable[[dict[str, Any]], Any]) -> None:
        self.registry, self.limits, self.open, self.embeddings = registry, limits, open, embeddings

    def rerank(self, request: dict[str, Any]) -> RerankResponse:
        """Score ``request["documents"]`` against ``request["query"]`` with the method its ``model`` names."""
        limits = self.limits()
        name, query, documents, top_n, keep = _check(request, limits.max_embedding_inputs)
        spec = self._spec(name)
        if spec.kind == "embedding":
            method, (scores, tokens) = "cosine", self.cosine_scores(spec.id, query, documents)
        elif spec.kind == "rerank":
            method, (scores, tokens) = "cross-encoder", self._run(spec, CrossEncoderJob(query, documents))
        else:
            method, (scores, tokens) = "judge", self.judge_scores(spec, query, documents, limits.max_prompts)
        order = sorted(range(len(documents)), key=lambda i: (-scores[i], i))[:top_n]
        results = [RerankResult(index=i, relevance_score=scores[i],
                                document={"text": documents[i]} if keep else None) for i in order]
        return RerankResponse(id=f"rerank-{uuid.uuid4().hex[:24]}", model=name or RERANK_ALIASES[0], method=method,
                              results=results, usage=RerankUsage(prompt_tokens=tokens, total_tokens=tokens))

    def _spec(self, name: str | None) -> ModelSpec:
        registry = self.registry
        if not name or name.lower() in RERANK_ALIASES:
            chosen = registry.defaults.get("rerank")
            spec = registry.get(chosen) if chosen else registry.default("chat")
            if spec is None:
                raise NotFoundError("no rerank or chat model is registered to serve rerank-1")
            return spec
        spec = registry.get(name)
        if spec is None or spec.kind not in ("chat", "embedding", "rerank"):
            known = ", ".join(m.id for m in registry.of_kind("chat", "embedding", "rerank"))
            raise NotFoundError(f"Model {name!r} cannot rerank: name a chat model (judge), an embedding model "
                                f"(cosine), a rerank entry, or rerank-1. Available: {known}")
        return spec

    def _run(self, spec: ModelSpec, job: JudgeJob | CrossEncoderJob) -> tuple[list[float], int]:
        """One scoring job on the model's worker: a score per document and the prompt tokens read."""
        if spec.remote is not None:
            raise invalid(f"model {spec.id!r} is remote; rerank scores with local models only", field="model")
        scores: dict[int, float] = {}
        tokens = 0
        with self.open(spec, ScoringCall(job)) as stream:
            for item in stream:
                if isinstance(item, Probed):
                    scores[item.index] = judge_score(item.logprobs, job.yes_count)
                    tokens += item.prompt_tokens
                elif isinstance(item, tuple):
                    index, score, count = item
                    scores[index] = score
                    tokens += count
        if len(scores) != job.cost:
            raise invalid("the scoring was stopped before every document had its score")
        return [scores[i] for i in range(job.cost)], tokens

    def judge_scores(self, spec: ModelSpec, query: str, documents: list[str], step: int) -> tuple[list[float], int]:
        """The chat model's P(yes) per document; documents go in groups of ``step`` (the model's queue bound)."""
        scores: list[float] = []
        tokens = 0
        for start in range(0, len(documents), max(1, step)):
            part, count = self._run(spec, JudgeJob(query, documents[start:start + step], spec.id))
            scores += part
            tokens += count
        return scores, tokens

    def cosine_scores(self, model: str, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Cosine similarity of each document's embedding to the query's (unit vectors, so a dot product)."""
        reply = self.embeddings({"model": model, "input": [query, *documents]})
        vectors = np.asarray([d.embedding for d in sorted(reply.data, key=lambda d: d.index)], dtype=np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return [float(s) for s in vectors[1:] @ vectors[0]], reply.usage.prompt_tokens


class _Items:
    def feed(self, item: Any) -> list[Any]:
        return [item]


class ScoringCall:
    """A scoring job (judge or cross-encoder) as a call: local models only."""

    what = "rerank"

    def __init__(self, job: JudgeJob | CrossEncoderJob) -> None:
        self.job = job

    def local(self, model_id: str) -> Prepared:
        return Prepared(Job(self.job, cost=self.job.cost, batched=self.job.batched), _Items(),
                        lambda items, metadata: items)

    def remote(self) -> Prepared:
        raise invalid("rerank scores with local models only", field="model")


def judge_score(logprobs: list[float], yes_count: int) -> float:
    """P(yes) / (P(yes) + P(no)) from the log-probabilities of the yes-tokens then the no-tokens."""
    yes, no = _logsumexp(logprobs[:yes_count]), _logsumexp(logprobs[yes_count:])
    return 1.0 / (1.0 + math.exp(min(700.0, no - yes)))


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def judge_messages(query: str, document: str) -> list[dict[str, str]]:
    """The judge's prompt: the query before the document, so every document's prompt shares the query's prefix."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": f"Query: {query}\n\nDocument: {document}\n\n"
                                        "Does the document answer the query? Answer Yes or No."}]


def _first_tokens(backend: Any, words: tuple[str, ...]) -> list[int]:
    out: list[int] = []
    for word in words:
        tokens = backend.tokenize(word, add_bos=False, special=False)
        if tokens and tokens[0] not in out:
            out.append(tokens[0])
    return out


class JudgeJob:
    """What a chat model's worker runs for one group of documents: a probe prompt each, batched by its scheduler.

    ``yes_count`` (how many of each Probed's log-probabilities are for yes-tokens; the rest are for no-tokens) is
    set on the worker before any result is pushed, and read by the caller as the results arrive.
    """

    batched = True

    def __init__(self, query: str, documents: list[str], model_id: str) -> None:
        self.query, self.documents, self.model_id = query, documents, model_id
        self.cost = len(documents)   # prompts: what the job counts against the model's queue
        self.yes_count = 0

    def __call__(self, backend: Any, ctx: JobContext) -> Any:
        if not hasattr(backend, "render_chat") or not hasattr(backend, "tokenize"):
            raise invalid(f"model {self.model_id!r} cannot judge relevance (it gives no next-token probabilities)",
                          field="model")
        yes = _first_tokens(backend, YES)
        no = [t for t in _first_tokens(backend, NO) if t not in yes]
        self.yes_count = len(yes)
        prompts = []
        for document in self.documents:
            prompt = backend.render_chat(judge_messages(self.query, document))
            tokens = backend.tokenize(prompt, add_bos=backend.add_bos_for_template(prompt))
            fit_prompt(tokens, backend, self.model_id)
            prompts.append(tokens)
        probe = yes + no
        if hasattr(backend, "scheduler"):
            siblings = [len(prompts)]
            return [PromptJob(tokens, GREEDY, 1, [], ctx.stream, index, siblings, ctx=ctx, probe=probe)
                    for index, tokens in enumerate(prompts)]
        return _plain_probes(backend, ctx, prompts, probe)


def _plain_probes(backend: Any, ctx: JobContext, prompts: list[list[int]], probe: list[int]) -> Iterator[Probed]:
    """One prompt at a time, on a backend without a batch scheduler (n_parallel = 1)."""
    import llama_cpp

    llama = backend.llama
    n_vocab = llama.n_vocab()
    for index, tokens in enumerate(prompts):
        if ctx.cancelled:
            return
        llama.reset()
        on_lane(llama.eval, tokens)   # llama.cpp computes on the process's compute lane
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1), shape=(n_vocab,))
        yield Probed(log_probs(logits, probe), len(tokens), index)
    llama.reset()  # its cache no longer matches what generation expects


class CrossEncoderJob:
    """What a rerank model's worker runs: (index, score, tokens) per document."""

    batched = False
    yes_count = 0

    def __init__(self, query: str, documents: list[str]) -> None:
        self.query, self.documents = query, documents
        self.cost = len(documents)

    def __call__(self, backend: Any, ctx: JobContext) -> Iterator[tuple[int, float, int]]:
        scores = backend.score(self.query, self.documents, cancelled=lambda: ctx.cancelled)
        for index, (score, count) in enumerate(scores):
            yield index, score, count
