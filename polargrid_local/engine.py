"""LocalEngine: the synchronous core behind PolarGrid and PolarGridSync.

Every public method takes the SDK's request objects (or dicts) and returns the
SDK's response types; streams are Stream objects, usable from threads and from
asyncio alike. Engine errors become the SDK's errors here, at the boundary.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from polargrid.types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    GenerateRequest,
    GenerateResponse,
    Message,
    TokenUsage,
)

from . import admin
from .errors import coerce, engine_boundary, invalid
from .host.gpu import NvmlProbe
from .host.offline import enable as enable_offline_guard
from .host.offline import offline_requested
from .limits import DEFAULT_LIMITS, Limits
from .llm.chunks import ChatChunker, CompletionChunker, fold_chat, fold_completion
from .llm.embeddings import embedding_job, plan_embeddings, shorten, split_options
from .llm.requests import (
    chat_job,
    check_stops,
    completion_job,
    completion_prompts,
    embedding_inputs,
    plan_chat,
    sampling_for,
)
from .runtime.events import EngineEvents, FirstToken
from .runtime.factories import default_factories
from .runtime.fallback import Router
from .runtime.keep_alive import split_keep_alive
from .runtime.pool import ModelPool
from .runtime.stream import Stream
from .runtime.usage import UsageBook
from .speech.jobs import TranscriptionJobs
from .speech.service import SpeechService
from .store.registry import ModelSpec, Registry
from .types import ChatCompletionChunk, CompletionChunk


class LocalEngine:
    """Models, workers and request handling for one process. Thread-safe; close() unloads everything."""

    def __init__(self, models: str | Path | Registry | None = None, *, cache_dir: str | Path | None = None,
                 factories: dict[str, Any] | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | str | None = None, n_ctx: int | None = None, n_parallel: int | None = None,
                 max_queue: int | None = None, memory_policy: str | None = None,
                 memory_budget_mb: int | None = None, nvml: NvmlProbe | None = None,
                 preload: tuple[str, ...] | list[str] = (), keep_alive: float | str | None = None,
                 models_only: bool = False, fake: Any = False, offline: bool = False,
                 limits: Limits | None = None) -> None:
        """``fake=True`` (or a testing.FakeScript) serves every model kind from polargrid_local.testing's
        deterministic fakes, without model files; ``offline=True`` turns on the offline guard (offline.py)."""
        self.limits = limits or DEFAULT_LIMITS
        if offline or offline_requested():
            enable_offline_guard()
        self.fake = None
        if fake:
            from .testing import FakeScript, fake_factories

            self.fake = fake if isinstance(fake, FakeScript) else FakeScript()
            factories = fake_factories(self.fake, factories)
        self.registry = models if isinstance(models, Registry) else Registry.load(models, cache_dir,
                                                                                  models_only=models_only)
        self.nvml = nvml or NvmlProbe()
        overrides = {"n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "n_parallel": n_parallel,
                     "max_queue": max_queue}
        policy = memory_policy or self.registry.settings.get("memory_policy", "refuse")
        self.pool = ModelPool(self.registry, factories or default_factories(), overrides=overrides, nvml=self.nvml,
                              memory_policy=policy, memory_budget_mb=memory_budget_mb, keep_alive=keep_alive,
                              limits=self.limits)
        self.usage = UsageBook()
        self.events = EngineEvents()   # what /metrics listens to (runtime/events.py)
        self.started = datetime.now(timezone.utc)
        self._closed = threading.Event()
        self.speech = SpeechService(self)
        self.jobs = TranscriptionJobs(self.speech)
        self.router = Router(self)
        for name in [*self.registry.settings.get("preload", []), *preload]:
            self.load_model({"model_name": name})

    # -- text ----------------------------------------------------------------------------

    def chat_completion_stream(self, request: ChatCompletionRequest | dict[str, Any], *,
                               stream_options: dict[str, Any] | None = None) -> Stream[ChatCompletionChunk]:
        """Stream a chat completion. ``stream_options={"include_usage": True}`` adds a final usage chunk."""
        request, keep_alive = split_keep_alive(request)
        if isinstance(request, dict):
            request = dict(request)
            stream_options = stream_options or request.pop("stream_options", None)
        request = coerce(ChatCompletionRequest, request, "chat completion request")
        usage = _include_usage(stream_options)
        return self.router.run(self.pool.resolve(request.model, "chat"),
                               lambda spec: self._chat_stream(self._keep(spec, keep_alive), request, usage),
                               lambda spec: self.router.remote.chat_stream(spec, request, usage))

    def _chat_stream(self, spec: ModelSpec, request: ChatCompletionRequest, usage: bool) -> Stream[ChatCompletionChunk]:
        plan = plan_chat(request, spec.id, self.limits)
        chunker = ChatChunker(request.model, request.tools, plan.tools, usage, plan.output)
        return self._open(spec, chat_job(plan, spec.id), chunker, "chat")

    def chat_completion(self, request: ChatCompletionRequest | dict[str, Any]):
        """A chat completion: the fold of its stream."""
        stream = self.chat_completion_stream(request, stream_options={"include_usage": True})
        with stream:
            chunks = list(stream)
        return fold_chat(chunks, stream.chunker, stream.metadata())

    def completion_stream(self, request: CompletionRequest | dict[str, Any], *,
                          stream_options: dict[str, Any] | None = None, seed: int | None = None
                          ) -> Stream[CompletionChunk]:
        """Stream a text completion; a list prompt gives one choice per prompt, in order. Beyond the SDK's
        fields, a dict may hold seed, min_p and repetition_penalty, as chat requests do."""
        extras: dict[str, Any] = {}
        request, keep_alive = split_keep_alive(request)
        if isinstance(request, dict):
            request = dict(request)
            stream_options = stream_options or request.pop("stream_options", None)
            seed = seed if seed is not None else request.pop("seed", None)
            extras = {k: request.pop(k) for k in ("min_p", "repetition_penalty") if k in request}
        request = coerce(CompletionRequest, request, "completion request")
        prompts = completion_prompts(request, self.limits)
        usage = _include_usage(stream_options)
        return self.router.run(self.pool.resolve(request.model, "chat"),
                               lambda spec: self._completion_stream(self._keep(spec, keep_alive), request, prompts,
                                                                    usage, seed, extras),
                               lambda spec: self.router.remote.completion_stream(spec, request, usage, seed, extras))

    def _completion_stream(self, spec: ModelSpec, request: CompletionRequest, prompts: list[str], usage: bool,
                           seed: int | None, extras: dict[str, Any]) -> Stream[CompletionChunk]:
        chunker = CompletionChunker(request.model, usage)
        chunker.prompts_total = len(prompts)
        params = sampling_for(request, seed=seed, **extras)
        job = completion_job(prompts, params, request.max_tokens or 100, check_stops(request.stop), spec.id)
        return self._open(spec, job, chunker, "completion")

    def completion(self, request: CompletionRequest | dict[str, Any], *, seed: int | None = None):
        """A text completion: the fold of its stream."""
        stream = self.completion_stream(request, stream_options={"include_usage": True}, seed=seed)
        with stream:
            chunks = list(stream)
        return fold_completion(chunks, stream.chunker, stream.metadata())

    def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """The SDK's legacy call: one user message, the reply's text."""
        request = coerce(GenerateRequest, request, "generate request")
        started = time.perf_counter()
        reply = self.chat_completion(ChatCompletionRequest(
            model=request.model, messages=[Message(role="user", content=request.prompt)],
            max_tokens=request.max_tokens or 150, temperature=0.7 if request.temperature is None else request.temperature,
            top_p=0.9 if request.top_p is None else request.top_p, stop=request.stop))
        return GenerateResponse(id=request.request_id or reply.id, model=reply.model,
                                content=reply.choices[0].message.content or "", usage=reply.usage,
                                created_at=datetime.fromtimestamp(reply.created).isoformat(),
                                processing_time_ms=round(1000 * (time.perf_counter() - started)))

    def embeddings(self, request: EmbeddingRequest | dict[str, Any], *, dimensions: int | None = None,
                   encoding_format: str | None = None) -> EmbeddingResponse:
        """One vector per input string. OpenAI's ``dimensions`` and ``encoding_format`` may also be request keys."""
        request, keep_alive = split_keep_alive(request)
        request, options = split_options(request, {"dimensions": dimensions, "encoding_format": encoding_format})
        request = coerce(EmbeddingRequest, request, "embedding request")
        plan = plan_embeddings(embedding_inputs(request, self.limits), options)
        return self.router.run(self.pool.resolve(request.model, "embedding"),
                               lambda spec: self._embeddings(self._keep(spec, keep_alive), request, plan),
                               lambda spec: _shortened(self.router.remote.embeddings(spec, request), plan.dimensions))

    def _embeddings(self, spec: ModelSpec, request: EmbeddingRequest, plan) -> EmbeddingResponse:
        with self.open_stream(spec, embedding_job(plan, spec.id, self.limits.embedding_batch), "embedding") as stream:
            vectors, count = next(stream)
        self.usage.record(spec.id, count)
        return EmbeddingResponse(data=[EmbeddingData(index=i, embedding=v) for i, v in enumerate(vectors)],
                                 model=request.model, usage=TokenUsage(prompt_tokens=count, completion_tokens=0,
                                                                       total_tokens=count))

    def open_stream(self, spec, job, what: str, convert=lambda item: [item], *, on_finish=None,
                    tail=None) -> Stream[Any]:
        """Load the model if needed, queue ``job`` on its worker, and return the caller's Stream.

        Every request goes through here, so loading and queueing failures become the SDK's errors in
        one place, and every stream reports the same load/queue/inference timings.
        """
        self.pool.begin(spec)
        try:
            with engine_boundary(what):
                worker, load_seconds = self.pool.worker(spec)
                results, ctx = worker.submit(job)
        except BaseException:
            self.pool.end(spec)
            raise
        stream = Stream(results, ctx, convert, load_seconds, on_finish=on_finish, tail=tail)
        stream.on_close = lambda: self.pool.end(spec)
        return stream

    def _keep(self, spec, keep_alive: float | None):
        """A request's keep_alive holds for its model from now on (as in Ollama: the last request sets it)."""
        if keep_alive is not None:
            self.pool.set_keep_alive(spec, keep_alive)
        return spec

    def _keep_for(self, request, kind: str):
        """Speech requests: take ``keep_alive`` out before the speech service validates the request."""
        request, keep_alive = split_keep_alive(request)
        if keep_alive is not None:
            name = request.get("model") if isinstance(request, dict) else None
            spec = self.registry.get(name) if name else self.registry.default(kind)
            if spec is not None:
                self._keep(spec, keep_alive)
        return request

    def _open(self, spec, job, chunker, what: str) -> Stream[Any]:
        timer = FirstToken(chunker.feed)

        def finished(stream: Stream[Any]) -> None:
            usage = chunker.usage
            self.usage.record(spec.id, usage.total_tokens if usage else 0, stream.metadata().latency_ms or 0)
            self.events.generation(spec.id, usage, timer.seconds)

        stream = self.open_stream(spec, job, what, timer, on_finish=finished)
        stream.chunker = chunker
        return stream

    # -- speech: see speech/service.py and speech/jobs.py ------------------------------------

    def text_to_speech(self, request) -> bytes:
        """Synthesise the whole input; bytes in the requested format."""
        return self.speech.speech(self._keep_for(request, "tts"))

    def text_to_speech_stream(self, request, *, default_format: str | None = None) -> Stream[bytes]:
        """Audio bytes per sentence as it is synthesised (``stream.content_type`` names the format)."""
        return self.speech.speech_stream(self._keep_for(request, "tts"), stream_default_format=default_format)

    def transcribe(self, file, request, *, on_open=None):
        """Transcription in the requested format: TranscriptionResponse, VerboseTranscriptionResponse or str.
        ``on_open`` gets the stream being folded (closing it cancels the work)."""
        return self.speech.transcribe(file, self._keep_for(request, "stt"), on_open=on_open)

    def transcribe_stream(self, file, request) -> Stream[Any]:
        """transcript.text.delta events per segment, then transcript.text.done."""
        return self.speech.transcribe_stream(file, self._keep_for(request, "stt"))

    def translate(self, file, request, *, on_open=None):
        """English text of speech in any language the model knows."""
        return self.speech.transcribe(file, self._keep_for(request, "stt"), task="translate", on_open=on_open)

    def transcribe_async(self, file, model: str = "stt-1b-en_fr", language: str | None = None,
                         prompt: str | None = None, response_format: str = "json", temperature: float | None = None):
        return self.jobs.submit(file, model, language, prompt, response_format, temperature)

    def get_transcription_job(self, job_id: str):
        return self.jobs.info(job_id)

    def get_transcription_result(self, job_id: str):
        return self.jobs.result(job_id)

    def list_transcription_jobs(self, status: str | None = None, limit: int = 50):
        return self.jobs.list(status, limit)

    # -- models, GPU, health: see admin.py -------------------------------------------------

    def list_models(self):
        return admin.list_models(self)

    def get_model(self, model_id: str):
        return admin.get_model(self, model_id)

    def load_model(self, request):
        return admin.load_model(self, request)

    def unload_model(self, request):
        return admin.unload_model(self, request)

    def unload_all_models(self):
        return admin.unload_all_models(self)

    def get_model_status(self):
        return admin.get_model_status(self)

    def get_gpu_status(self):
        return admin.get_gpu_status(self)

    def get_gpu_memory(self):
        return admin.get_gpu_memory(self)

    def purge_gpu(self, request=None):
        return admin.purge_gpu(self, request)

    def health(self):
        return admin.health(self)

    def get_status(self):
        return admin.get_status(self)

    def get_usage(self, start_date: str | None = None, end_date: str | None = None):
        return self.usage.report(self, start_date, end_date)

    def close(self) -> None:
        """Unload every model and stop their workers."""
        if not self._closed.is_set():
            self._closed.set()
            self.pool.close()


def _shortened(reply: EmbeddingResponse, dimensions: int | None) -> EmbeddingResponse:
    """A remote's vectors cut to ``dimensions`` and renormalised, as the local models answer."""
    if dimensions is None:
        return reply
    for item, vector in zip(reply.data, shorten([d.embedding for d in reply.data], dimensions)):
        item.embedding = vector
    return reply


def _include_usage(stream_options: dict[str, Any] | None) -> bool:
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object like {'include_usage': true}", field="stream_options")
    return bool(stream_options.get("include_usage"))
