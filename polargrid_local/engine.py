"""LocalEngine: the synchronous core behind PolarGrid and PolarGridSync.

Every public method takes the SDK's request objects (or dicts) and returns the SDK's response types;
streams are Stream objects, usable from threads and from asyncio alike. A request becomes a call
(llm/calls.py, speech/calls.py) that ``open`` runs on its model: the one place that counts requests in
flight, loads models, submits work and reports usage. Engine errors become the SDK's errors at that
boundary.
"""
from __future__ import annotations

import platform
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from polargrid.types import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    EmbeddingResponse,
    GenerateRequest,
    GenerateResponse,
    Message,
)

from .admin import Admin
from .errors import ServerError, coerce, engine_boundary, invalid
from .host.gpu import NvmlProbe
from .host.offline import enable as enable_offline_guard
from .host.offline import offline_requested
from .limits import DEFAULT_LIMITS, Limits
from .llm.calls import ChatCall, CompletionCall, EmbeddingCall
from .llm.drafting import split_speculative
from .llm.embeddings import plan_embeddings, split_options
from .llm.prompt_cache import PromptCacheConfig, cache_status
from .llm.requests import completion_prompts, embedding_inputs
from .llm.rerank import Reranker, RerankResponse
from .remote.probes import Reachability
from .runtime.at_exit import close_at_exit, forget
from .runtime.events import EngineEvents, FirstToken
from .runtime.factories import default_factories
from .runtime.fallback import Router
from .runtime.interfaces import Call
from .runtime.keep_alive import split_keep_alive
from .runtime.pool import ModelPool
from .runtime.stream import Stream
from .runtime.usage import UsageBook
from .speech.jobs import TranscriptionJobs
from .speech.service import SpeechService
from .store.registry import ModelSpec, Registry
from .types import CachedPrompt, ChatCompletionChunk, CompletionChunk, PromptCacheStatus


class LocalEngine:
    """Models, workers and request handling for one process. Thread-safe; close() unloads everything."""

    def __init__(self, models: str | Path | Registry | None = None, *, cache_dir: str | Path | None = None,
                 factories: dict[str, Any] | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | str | None = None, n_ctx: int | None = None, n_parallel: int | None = None,
                 max_queue: int | None = None, memory_policy: str | None = None,
                 memory_budget_mb: int | None = None, nvml: NvmlProbe | None = None,
                 preload: tuple[str, ...] | list[str] = (), keep_alive: float | str | None = None,
                 models_only: bool = False, fake: Any = False, offline: bool = False,
                 limits: Limits | None = None, prompt_cache: bool | None = None,
                 prompt_cache_dir: str | Path | None = None, prompt_cache_bytes: int | None = None,
                 prompt_cache_min_tokens: int | None = None) -> None:
        """``fake=True`` (or a testing.FakeScript) serves every model kind from polargrid_local.testing's
        deterministic fakes, without model files; ``offline=True`` turns on the offline guard (host/offline.py).
        ``prompt_cache`` (on unless False or models.toml says otherwise) keeps processed prompts' KV states in
        ``prompt_cache_dir`` (default: a prompt-cache folder in the model cache, or
        $POLARGRID_LOCAL_PROMPT_CACHE_DIR), at most ``prompt_cache_bytes`` (1 GiB), for prompts of at least
        ``prompt_cache_min_tokens`` (256); see README, "Prompt cache"."""
        self._limits = limits or DEFAULT_LIMITS
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
        self.prompt_cache = PromptCacheConfig.resolve(prompt_cache, prompt_cache_dir, prompt_cache_bytes,
                                                      prompt_cache_min_tokens, self.registry.settings,
                                                      self.registry.cache_dir)
        overrides = {"n_threads": n_threads, "n_gpu_layers": n_gpu_layers, "n_ctx": n_ctx, "n_parallel": n_parallel,
                     "max_queue": max_queue, "prompt_cache": self.prompt_cache}
        policy = memory_policy or self.registry.settings.get("memory_policy", "refuse")
        self.pool = ModelPool(self.registry, factories or default_factories(), overrides=overrides, nvml=self.nvml,
                              memory_policy=policy, memory_budget_mb=memory_budget_mb, keep_alive=keep_alive,
                              limits=self._limits)
        self.usage = UsageBook()
        self.events = EngineEvents()   # what /metrics listens to (runtime/events.py)
        self.started = datetime.now(timezone.utc)
        self._closed = threading.Event()
        self.router = Router(self.registry)
        self._probes = Reachability()
        self.admin = Admin(self.registry, self.pool, self.usage, self.nvml, self.reachability, self._closed.is_set,
                           self._runtime, prompt_cache=self._prompt_cache_status)
        self.speech = SpeechService(self.pool, self.open, self.router, self.limits)
        self.jobs = TranscriptionJobs(self.speech.check_transcription, self.speech.transcribe)
        self.reranker = Reranker(self.registry, lambda: self.limits, self.open, self.embeddings)
        close_at_exit(self)   # an app that never calls close() (or exits mid-stream) still exits cleanly
        for name in [*self.registry.settings.get("preload", []), *preload]:
            self.load_model({"model_name": name})

    @property
    def limits(self) -> Limits:
        """The bounds this engine enforces (the HTTP server in front of it reads them too)."""
        return self._limits

    @limits.setter
    def limits(self, limits: Limits) -> None:
        """New bounds for the requests that start from now on."""
        self._limits = self.pool.limits = self.speech.limits = limits

    # -- running a request on a model --------------------------------------------------------

    def open(self, spec: ModelSpec, call: Call) -> Stream[Any]:
        """Run ``call`` on the model ``spec`` and return the caller's Stream. Every request goes through here.

        The call is prepared for the side that serves the model (checked before anything loads), the request
        is counted in flight until its stream ends or is closed, the model is loaded if needed, and loading
        and queueing failures become the SDK's errors in one place. Every stream reports the same
        load/queue/inference timings, records usage when it ends, and folds into its whole response.
        """
        prepared = call.remote() if self.pool.forwards(spec) else call.local(spec.id)
        self.pool.begin(spec)
        try:
            with engine_boundary(call.what):
                worker, load_seconds = self.pool.worker(spec)
                channel, ctx = worker.submit(prepared.work)
        except BaseException:
            self.pool.end(spec)
            raise

        generation = call.what in ("chat", "completion") and not self.pool.forwards(spec)
        convert = FirstToken(prepared.reader.feed) if generation else prepared.reader.feed

        def finished(stream: Stream[Any]) -> None:
            if prepared.counted:
                self.usage.record(spec.id, prepared.tokens(), stream.metadata().latency_ms or 0)
            if isinstance(convert, FirstToken):   # what /metrics hears of a local generation
                self.events.generation(spec.id, prepared.reader.usage, convert.seconds)

        stream = Stream(channel, ctx, convert, load_seconds, on_finish=finished, tail=prepared.tail)
        stream.chunker = prepared.reader
        stream.folder = prepared.fold
        stream.region = worker.region
        stream.content_type = prepared.content_type
        stream.on_close = lambda: self.pool.end(spec)
        return stream

    def _run(self, name: str | None, kind: str, call: Call, keep_alive: float | None) -> Stream[Any]:
        """``call`` on the model named ``name`` (the default of ``kind`` when None), or on its fallbacks."""
        return self.router.run(self.pool.resolve(name, kind), lambda spec: self.open(self._keep(spec, keep_alive),
                                                                                    call))

    def _keep(self, spec: ModelSpec, keep_alive: float | None) -> ModelSpec:
        """A request's keep_alive holds for its model from now on (as in Ollama: the last request sets it)."""
        if keep_alive is not None:
            self.pool.set_keep_alive(spec, keep_alive)
        return spec

    def _keep_for(self, request: Any, kind: str) -> Any:
        """Speech requests: take ``keep_alive`` out before the speech service validates the request."""
        request, keep_alive = split_keep_alive(request)
        if keep_alive is not None:
            name = request.get("model") if isinstance(request, dict) else None
            spec = self.registry.get(name) if name else self.registry.default(kind)
            if spec is not None:
                self._keep(spec, keep_alive)
        return request

    @staticmethod
    def fold(stream: Stream[Any]) -> Any:
        """Read a whole stream and fold it into its response (the non-streaming calls)."""
        with stream:
            return stream.fold(stream.collect())

    # -- text ----------------------------------------------------------------------------

    def chat_completion_stream(self, request: ChatCompletionRequest | dict[str, Any], *,
                               stream_options: dict[str, Any] | None = None) -> Stream[ChatCompletionChunk]:
        """Stream a chat completion. ``stream_options={"include_usage": True}`` adds a final usage chunk."""
        request, keep_alive = split_keep_alive(request)
        request, speculative = split_speculative(request)
        if isinstance(request, dict):
            request = dict(request)
            stream_options = stream_options or request.pop("stream_options", None)
        request = coerce(ChatCompletionRequest, request, "chat completion request")
        call = ChatCall(request, _include_usage(stream_options), self.limits, speculative=speculative)
        return self._run(request.model, "chat", call, keep_alive)

    def chat_completion(self, request: ChatCompletionRequest | dict[str, Any]):
        """A chat completion: the fold of its stream."""
        return self.fold(self.chat_completion_stream(request, stream_options={"include_usage": True}))

    def completion_stream(self, request: CompletionRequest | dict[str, Any], *,
                          stream_options: dict[str, Any] | None = None, seed: int | None = None
                          ) -> Stream[CompletionChunk]:
        """Stream a text completion; a list prompt gives one choice per prompt, in order. Beyond the SDK's
        fields, a dict may hold seed, min_p and repetition_penalty, as chat requests do, and ``speculative``
        (false: no drafts)."""
        extras: dict[str, Any] = {}
        request, keep_alive = split_keep_alive(request)
        request, speculative = split_speculative(request)
        if isinstance(request, dict):
            request = dict(request)
            stream_options = stream_options or request.pop("stream_options", None)
            seed = seed if seed is not None else request.pop("seed", None)
            extras = {k: request.pop(k) for k in ("min_p", "repetition_penalty") if k in request}
        request = coerce(CompletionRequest, request, "completion request")
        call = CompletionCall(request, completion_prompts(request, self.limits), _include_usage(stream_options), seed,
                              extras, speculative=speculative)
        return self._run(request.model, "chat", call, keep_alive)

    def completion(self, request: CompletionRequest | dict[str, Any], *, seed: int | None = None):
        """A text completion: the fold of its stream."""
        return self.fold(self.completion_stream(request, stream_options={"include_usage": True}, seed=seed))

    def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """The SDK's legacy call: one user message, the reply's text."""
        request = coerce(GenerateRequest, request, "generate request")
        started = time.perf_counter()
        reply = self.chat_completion(ChatCompletionRequest(
            model=request.model, messages=[Message(role="user", content=request.prompt)],
            max_tokens=request.max_tokens or 150,
            temperature=0.7 if request.temperature is None else request.temperature,
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
        call = EmbeddingCall(request, plan, self.limits.embedding_batch)
        return self.fold(self._run(request.model, "embedding", call, keep_alive))

    def rerank(self, request: dict[str, Any]) -> RerankResponse:
        """Documents ordered by relevance to a query (Cohere's and Jina's shape; a local extra): see llm/rerank.py."""
        return self.reranker.rerank(request)

    def cache_prompt(self, request: ChatCompletionRequest | CompletionRequest | dict[str, Any]) -> CachedPrompt:
        """Process a prompt now and keep its KV state in the prompt cache, pinned (evicted last): a system
        prompt or document the app will send again, in this process or the next. ``{"model", "messages"}``
        (as a chat request renders them) or ``{"model", "prompt"}`` (a completion's text)."""
        request, keep_alive = split_keep_alive(request)
        fields = request.model_dump(exclude_none=True) if hasattr(request, "model_dump") else request
        if not isinstance(fields, dict):
            raise invalid("cache_prompt takes a request with model and messages (or prompt)")
        fields = {**fields, "max_tokens": 1, "temperature": 0, "stream": False}
        pin: Future[Any] = Future()
        if "messages" not in fields and "prompt" in fields:
            if not isinstance(fields["prompt"], str):
                raise invalid("cache_prompt takes one prompt (a string)", field="prompt")
            completion = coerce(CompletionRequest, fields, "cache_prompt request")
            call: Call = CompletionCall(completion, completion_prompts(completion, self.limits), False, None, {},
                                        pin=pin)
            model = completion.model
        else:
            chat = coerce(ChatCompletionRequest, fields, "cache_prompt request")
            call, model = ChatCall(chat, False, self.limits, pin=pin), chat.model
        self.fold(self._run(model, "chat", call, keep_alive))
        try:
            entry = pin.result(timeout=self.limits.request_timeout_s)
        except FutureTimeout:
            raise ServerError("the prompt was processed but its state was not saved in time", 504) from None
        return CachedPrompt(model=model, key=entry.key, tokens=len(entry.tokens), bytes=entry.size,
                            pinned=entry.pinned)

    def _prompt_cache_status(self) -> PromptCacheStatus | None:
        return cache_status(self.prompt_cache) if self.prompt_cache is not None else None

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
        return self.admin.list_models()

    def get_model(self, model_id: str):
        return self.admin.get_model(model_id)

    def load_model(self, request):
        return self.admin.load_model(request)

    def unload_model(self, request):
        return self.admin.unload_model(request)

    def unload_all_models(self):
        return self.admin.unload_all_models()

    def get_model_status(self):
        return self.admin.get_model_status()

    def get_gpu_status(self):
        return self.admin.get_gpu_status()

    def get_gpu_memory(self):
        return self.admin.get_gpu_memory()

    def purge_gpu(self, request=None):
        return self.admin.purge_gpu(request)

    def health(self):
        return self.admin.health()

    def get_status(self):
        return self.admin.get_status()

    def get_usage(self, start_date: str | None = None, end_date: str | None = None):
        return self.usage.report(self.started, start_date, end_date)

    def reachability(self, spec: ModelSpec) -> str:
        """'up', 'down' or 'offline' for a model a remote server answers (a cached probe); 'up' for a model
        served in this process."""
        return self._probes(spec) if self.pool.forwards(spec) else "up"

    def _runtime(self) -> str:
        """What runs the models, for health: the chat factory describes itself."""
        describe = getattr(self.pool.factories.get("chat"), "describe", None)
        return f"python-{platform.python_version()} " + (describe() if describe else "custom engines")

    def close(self) -> None:
        """Unload every model and stop their workers."""
        if not self._closed.is_set():
            self._closed.set()
            self._probes.close()
            self.pool.close()
            forget(self)


def _include_usage(stream_options: dict[str, Any] | None) -> bool:
    if stream_options is None:
        return False
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object like {'include_usage': true}", field="stream_options")
    return bool(stream_options.get("include_usage"))
