"""PolarGrid (async) and PolarGridSync: polargrid-sdk 0.10.0's clients, answered in-process.

Swap ``from polargrid import PolarGrid`` for ``from polargrid_local import PolarGrid``
and the same code runs locally. The SDK's connection arguments (api_key, region,
base_url, ...) are accepted and ignored; local options are extra keyword arguments.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from polargrid import errors as sdk_errors
from polargrid.client import DEFAULT_ROUTING_SCOPE
from polargrid.types import (
    AsyncTranscriptionJobAccepted,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    GenerateRequest,
    GenerateResponse,
    GPUMemoryResponse,
    GPUPurgeRequest,
    GPUPurgeResponse,
    GPUStatusResponse,
    HealthResponse,
    ListModelsResponse,
    LoadModelRequest,
    LoadModelResponse,
    ModelInfo,
    ModelStatusResponse,
    SystemStatus,
    TextToSpeechRequest,
    TranscriptionJobInfo,
    TranscriptionJobListResponse,
    TranscriptionJobResult,
    TranscriptionJobStatus,
    TranscriptionRequest,
    TranscriptionResponse,
    TranscriptionStreamEvent,
    TranslationRequest,
    TranslationResponse,
    UnloadAllModelsResponse,
    UnloadModelRequest,
    UnloadModelResponse,
    UsageResponse,
)

from .audio.decode import AudioInput
from .client_extras import AsyncExtras, SyncExtras
from .engine import LocalEngine
from .host.offline import enable as enable_offline_guard
from .limits import Limits
from .speech.formats import VerboseTranscriptionResponse
from .store.registry import Registry
from .types import CachedPrompt, ChatCompletionChunk, CompletionChunk

logger = logging.getLogger("polargrid_local")

REGION_ID = "local"
REGION_NAME = "Local (in-process)"


def _engine(engine: LocalEngine | None, models: str | Path | Registry | None, local: dict[str, Any],
            sdk_args: dict[str, Any]) -> LocalEngine:
    if sdk_args.get("base_url") or sdk_args.get("region"):
        logger.info("polargrid_local runs in-process; base_url/region are ignored")
    return engine or LocalEngine(models, **local)


def _job_done(info: TranscriptionJobInfo, job_id: str, started: float, timeout: float) -> bool:
    """True when completed; the SDK's exceptions when failed, cancelled or out of time."""
    if info.status == TranscriptionJobStatus.COMPLETED:
        return True
    if info.status == TranscriptionJobStatus.FAILED:
        raise RuntimeError(f"Transcription failed: {info.error or 'Unknown error'} ({info.error_code or 'unknown'})")
    if info.status == TranscriptionJobStatus.CANCELLED:
        raise RuntimeError(f"Transcription job {job_id} was cancelled")
    if time.monotonic() - started > timeout:
        raise sdk_errors.TimeoutError(f"Transcription job {job_id} timed out after {timeout:.0f}s")
    return False


def wait_for_job(engine: LocalEngine, job_id: str, poll_interval: float, timeout: float,
                 on_progress: Callable[[TranscriptionJobInfo], Any] | None, sleep: Callable[[float], Any]
                 ) -> TranscriptionJobResult:
    started = time.monotonic()
    while True:
        info = engine.get_transcription_job(job_id)
        if on_progress is not None:
            on_progress(info)
        if _job_done(info, job_id, started, timeout):
            return engine.get_transcription_result(job_id)
        sleep(poll_interval)


class _LocalClient:
    """What both clients share: the engine they bridge to, the region they report, and the SDK's session
    accessors. The SDK's parameters come first, positionally as in polargrid.PolarGrid; local options are
    keyword-only (tests/test_parity.py holds both clients to the SDK's signatures)."""

    def __init__(self, api_key: str | None = None, base_url: str | None = None, auth_url: str | None = None,
                 region: str | None = None, timeout: float = 30.0, max_retries: int = 3, debug: bool = False,
                 use_mock_data: bool = False, *, models: str | Path | Registry | None = None,
                 cache_dir: str | Path | None = None, n_threads: int | None = None,
                 n_gpu_layers: int | str | None = None, n_ctx: int | None = None, n_parallel: int | None = None,
                 max_queue: int | None = None, memory_policy: str | None = None,
                 memory_budget_mb: int | None = None, preload: list[str] | tuple = (),
                 keep_alive: float | str | None = None, models_only: bool = False,
                 engine: LocalEngine | None = None, fake: Any = False, offline: bool = False,
                 limits: Limits | None = None, prompt_cache: bool | None = None,
                 prompt_cache_dir: str | Path | None = None, prompt_cache_bytes: int | None = None,
                 prompt_cache_min_tokens: int | None = None) -> None:
        local = dict(cache_dir=cache_dir, n_threads=n_threads, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                     n_parallel=n_parallel, max_queue=max_queue, memory_policy=memory_policy,
                     memory_budget_mb=memory_budget_mb, preload=preload, keep_alive=keep_alive,
                     models_only=models_only, fake=fake, offline=offline, limits=limits, prompt_cache=prompt_cache,
                     prompt_cache_dir=prompt_cache_dir, prompt_cache_bytes=prompt_cache_bytes,
                     prompt_cache_min_tokens=prompt_cache_min_tokens)
        self.engine = _engine(engine, models, local, {"base_url": base_url, "region": region})
        if offline and engine is not None:
            enable_offline_guard()
        self._refresh_token: str | None = None
        self._session_id = str(uuid.uuid4())

    @property
    def fake(self):
        """The fake engines' script (polargrid_local.testing.FakeScript) when made with fake=True, else None."""
        return self.engine.fake

    def close(self) -> None:
        """Unload every model."""
        self.engine.close()

    def get_region_id(self) -> str:
        return REGION_ID

    def get_region_name(self) -> str:
        return REGION_NAME

    # The SDK's (deprecated) session accessors. There is no auth server here: a refresh token is only
    # stored and returned, and the session is this client's own id until invalidate_session starts another.

    def get_refresh_token(self) -> str | None:
        """The refresh token last stored with set_refresh_token (None if none)."""
        return self._refresh_token

    def set_refresh_token(self, refresh_token: str | None) -> None:
        """Store a refresh token; it has no effect locally, as in the SDK since 0.7.0."""
        self._refresh_token = refresh_token

    def get_session_id(self) -> str | None:
        """This client's local session id (a uuid)."""
        return self._session_id

    def invalidate_session(self) -> None:
        """Forget the refresh token and start a new local session id."""
        self._refresh_token = None
        self._session_id = str(uuid.uuid4())


class PolarGridSync(SyncExtras, _LocalClient):
    """The synchronous client. Streams are real iterators: chunks arrive as they are generated."""

    def __enter__(self) -> PolarGridSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def chat_completion(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        """Generate a chat completion."""
        return self.engine.chat_completion(request)

    def chat_completion_stream(self, request: ChatCompletionRequest | dict[str, Any], *,
                               stream_options: dict[str, Any] | None = None) -> Iterator[ChatCompletionChunk]:
        """Stream a chat completion; close the iterator (or stop reading it) to cancel."""
        return self.engine.chat_completion_stream(request, stream_options=stream_options)

    def completion(self, request: CompletionRequest | dict[str, Any]) -> CompletionResponse:
        """Generate a text completion."""
        return self.engine.completion(request)

    def completion_stream(self, request: CompletionRequest | dict[str, Any], *,
                          stream_options: dict[str, Any] | None = None) -> Iterator[CompletionChunk]:
        """Stream a text completion."""
        return self.engine.completion_stream(request, stream_options=stream_options)

    def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """The SDK's legacy single-prompt call."""
        return self.engine.generate(request)

    def embeddings(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        """Embed one or more strings."""
        return self.engine.embeddings(request)

    def cache_prompt(self, request: ChatCompletionRequest | CompletionRequest | dict[str, Any]) -> CachedPrompt:
        """A local extra: process ``{"model", "messages"}`` (or ``"prompt"``) now and keep its state in the prompt
        cache, pinned, so requests that start with it (here or in a later process) skip processing it."""
        return self.engine.cache_prompt(request)

    def text_to_speech(self, request: TextToSpeechRequest | dict[str, Any]) -> bytes:
        """Speak the input; bytes in response_format (mp3 by default; opus, aac, flac, wav, pcm)."""
        return self.engine.text_to_speech(request)

    def text_to_speech_stream(self, request: TextToSpeechRequest | dict[str, Any]) -> Iterator[bytes]:
        """Audio bytes as each sentence is synthesised (opus unless response_format is given, as the SDK)."""
        return self.engine.text_to_speech_stream(request, default_format="opus")

    def transcribe(self, file: AudioInput, request: TranscriptionRequest | dict[str, Any]
                   ) -> TranscriptionResponse | VerboseTranscriptionResponse | str:
        """Transcribe a file (path, bytes or file object) in any container PyAV reads."""
        return self.engine.transcribe(file, request)

    def transcribe_stream(self, file: AudioInput, request: TranscriptionRequest | dict[str, Any]
                          ) -> Iterator[TranscriptionStreamEvent]:
        """Delta events as segments are decoded, then a done event."""
        return self.engine.transcribe_stream(file, request)

    def translate(self, file: AudioInput, request: TranslationRequest | dict[str, Any]) -> TranslationResponse | str:
        """Speech in another language to English text."""
        return self.engine.translate(file, request)

    def transcribe_async(self, file: AudioInput, model: str = "stt-1b-en_fr", language: str | None = None,
                         prompt: str | None = None, response_format: str = "json",
                         temperature: float | None = None) -> AsyncTranscriptionJobAccepted:
        """Start a transcription job; poll it with get_transcription_job."""
        return self.engine.transcribe_async(file, model, language, prompt, response_format, temperature)

    def get_transcription_job(self, job_id: str) -> TranscriptionJobInfo:
        """A job's status and progress (0..1)."""
        return self.engine.get_transcription_job(job_id)

    def get_transcription_result(self, job_id: str) -> TranscriptionJobResult:
        """A completed job's text, language and duration."""
        return self.engine.get_transcription_result(job_id)

    def list_transcription_jobs(self, status: str | None = None, limit: int = 50) -> TranscriptionJobListResponse:
        """Recent jobs, newest first."""
        return self.engine.list_transcription_jobs(status, limit)

    def transcribe_and_wait(self, file: AudioInput, model: str = "stt-1b-en_fr", language: str | None = None,
                            prompt: str | None = None, response_format: str = "json",
                            temperature: float | None = None, poll_interval: float = 1.0, timeout: float = 600.0,
                            on_progress: Callable[[TranscriptionJobInfo], Any] | None = None
                            ) -> TranscriptionJobResult:
        """Submit a job and poll until it completes (TimeoutError, or RuntimeError if it fails)."""
        job = self.transcribe_async(file, model, language, prompt, response_format, temperature)
        return wait_for_job(self.engine, job.job_id, poll_interval, timeout, on_progress, time.sleep)

    def list_models(self) -> ListModelsResponse:
        """Every model in the registry, with aliases."""
        return self.engine.list_models()

    def get_model(self, model_id: str) -> ModelInfo:
        """One model by id or alias; NotFoundError if unknown."""
        return self.engine.get_model(model_id)

    def load_model(self, request: LoadModelRequest | dict[str, Any]) -> LoadModelResponse:
        """Load a model now rather than on its first request."""
        return self.engine.load_model(request)

    def unload_model(self, request: UnloadModelRequest | dict[str, Any]) -> UnloadModelResponse:
        """Unload a model and release its memory."""
        return self.engine.unload_model(request)

    def unload_all_models(self) -> UnloadAllModelsResponse:
        """Unload every loaded model."""
        return self.engine.unload_all_models()

    def get_model_status(self) -> ModelStatusResponse:
        """Which models are loaded, loading, unloaded or failed."""
        return self.engine.get_model_status()

    def get_gpu_status(self) -> GPUStatusResponse:
        """Devices, memory, utilisation and processes from NVML; zero GPUs on a CPU-only machine."""
        return self.engine.get_gpu_status()

    def get_gpu_memory(self) -> GPUMemoryResponse:
        """Memory per GPU."""
        return self.engine.get_gpu_memory()

    def purge_gpu(self, request: GPUPurgeRequest | dict[str, Any] | None = None) -> GPUPurgeResponse:
        """Unload models and report the memory released."""
        return self.engine.purge_gpu(request)

    def health(self) -> HealthResponse:
        """Whether the engine is serving."""
        return self.engine.health()

    def get_status(self) -> SystemStatus:
        """Per-model availability, latency and queue depth in the 'local' region."""
        return self.engine.get_status()

    def get_usage(self, start_date: str | None = None, end_date: str | None = None) -> UsageResponse:
        """Requests and tokens served by this engine since it started."""
        return self.engine.get_usage(start_date, end_date)


class PolarGrid(AsyncExtras, _LocalClient):
    """The async client: the same calls as polargrid.PolarGrid, a thin bridge over LocalEngine."""

    @classmethod
    async def create(cls, api_key: str | None = None, base_url: str | None = None, auth_url: str | None = None,
                     region: str | None = None, timeout: float = 30.0, max_retries: int = 3, debug: bool = False,
                     use_mock_data: bool = False, routing_scope: str = DEFAULT_ROUTING_SCOPE,
                     routing_model: str | None = None, **local: Any) -> PolarGrid:
        """Build a client without blocking the event loop (the registry is read, preloads load, in a thread).
        There is no region to discover: routing_scope and routing_model are accepted and ignored; local options
        (models=, n_parallel=, engine=...) are keywords, as for the constructor."""
        return await asyncio.to_thread(cls, api_key, base_url, auth_url, region, timeout, max_retries, debug,
                                       use_mock_data, **local)

    async def aclose(self) -> None:
        """Unload every model."""
        await asyncio.to_thread(self.engine.close)

    async def __aenter__(self) -> PolarGrid:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @staticmethod
    async def _relay(open_stream: Callable[..., Any], *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Open an engine stream off the event loop, then relay it; leaving early closes (cancels) it."""
        stream = await asyncio.to_thread(open_stream, *args, **kwargs)
        try:
            async for item in stream:
                yield item
        finally:
            stream.close()

    @staticmethod
    async def _folded(open_stream: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """The whole response: the stream read without blocking the loop, then folded."""
        stream = await asyncio.to_thread(open_stream, *args, **kwargs)
        with stream:
            return stream.fold(await stream.acollect())

    async def chat_completion_stream(self, request: ChatCompletionRequest | dict[str, Any], *,
                                     stream_options: dict[str, Any] | None = None
                                     ) -> AsyncIterator[ChatCompletionChunk]:
        """Stream a chat completion; leaving the loop or cancelling the task stops the generation."""
        async for chunk in self._relay(self.engine.chat_completion_stream, request, stream_options=stream_options):
            yield chunk

    async def chat_completion(self, request: ChatCompletionRequest | dict[str, Any]) -> ChatCompletionResponse:
        """Generate a chat completion: the fold of its stream."""
        return await self._folded(self.engine.chat_completion_stream, request, stream_options={"include_usage": True})

    async def completion_stream(self, request: CompletionRequest | dict[str, Any], *,
                                stream_options: dict[str, Any] | None = None) -> AsyncIterator[CompletionChunk]:
        """Stream a text completion."""
        async for chunk in self._relay(self.engine.completion_stream, request, stream_options=stream_options):
            yield chunk

    async def completion(self, request: CompletionRequest | dict[str, Any]) -> CompletionResponse:
        """Generate a text completion: the fold of its stream."""
        return await self._folded(self.engine.completion_stream, request, stream_options={"include_usage": True})

    async def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """The SDK's legacy single-prompt call."""
        return await asyncio.to_thread(self.engine.generate, request)

    async def embeddings(self, request: EmbeddingRequest | dict[str, Any]) -> EmbeddingResponse:
        """Embed one or more strings."""
        return await asyncio.to_thread(self.engine.embeddings, request)

    async def cache_prompt(self, request: ChatCompletionRequest | CompletionRequest | dict[str, Any]
                           ) -> CachedPrompt:
        """A local extra: process ``{"model", "messages"}`` (or ``"prompt"``) now and keep its state in the prompt
        cache, pinned, so requests that start with it (here or in a later process) skip processing it."""
        return await asyncio.to_thread(self.engine.cache_prompt, request)

    async def text_to_speech(self, request: TextToSpeechRequest | dict[str, Any]) -> bytes:
        """Speak the input; bytes in response_format (mp3 by default; opus, aac, flac, wav, pcm)."""
        return await asyncio.to_thread(self.engine.text_to_speech, request)

    async def text_to_speech_stream(self, request: TextToSpeechRequest | dict[str, Any]) -> AsyncIterator[bytes]:
        """Audio bytes as each sentence is synthesised (opus unless response_format is given, as the SDK)."""
        async for piece in self._relay(self.engine.text_to_speech_stream, request, default_format="opus"):
            yield piece

    async def transcribe(self, file: AudioInput, request: TranscriptionRequest | dict[str, Any]
                         ) -> TranscriptionResponse | VerboseTranscriptionResponse | str:
        """Transcribe a file (path, bytes or file object) in any container PyAV reads."""
        return await asyncio.to_thread(self.engine.transcribe, file, request)

    async def transcribe_stream(self, file: AudioInput, request: TranscriptionRequest | dict[str, Any]
                                ) -> AsyncIterator[TranscriptionStreamEvent]:
        """Delta events as segments are decoded, then a done event."""
        async for event in self._relay(self.engine.transcribe_stream, file, request):
            yield event

    async def translate(self, file: AudioInput, request: TranslationRequest | dict[str, Any]
                        ) -> TranslationResponse | str:
        """Speech in another language to English text."""
        return await asyncio.to_thread(self.engine.translate, file, request)

    async def transcribe_async(self, file: AudioInput, model: str = "stt-1b-en_fr", language: str | None = None,
                               prompt: str | None = None, response_format: str = "json",
                               temperature: float | None = None) -> AsyncTranscriptionJobAccepted:
        """Start a transcription job; poll it with get_transcription_job."""
        return await asyncio.to_thread(self.engine.transcribe_async, file, model, language, prompt,
                                       response_format, temperature)

    async def get_transcription_job(self, job_id: str) -> TranscriptionJobInfo:
        """A job's status and progress (0..1)."""
        return await asyncio.to_thread(self.engine.get_transcription_job, job_id)

    async def get_transcription_result(self, job_id: str) -> TranscriptionJobResult:
        """A completed job's text, language and duration."""
        return await asyncio.to_thread(self.engine.get_transcription_result, job_id)

    async def list_transcription_jobs(self, status: str | None = None, limit: int = 50
                                      ) -> TranscriptionJobListResponse:
        """Recent jobs, newest first."""
        return await asyncio.to_thread(self.engine.list_transcription_jobs, status, limit)

    async def transcribe_and_wait(self, file: AudioInput, model: str = "stt-1b-en_fr", language: str | None = None,
                                  prompt: str | None = None, response_format: str = "json",
                                  temperature: float | None = None, poll_interval: float = 1.0,
                                  timeout: float = 600.0,
                                  on_progress: Callable[[TranscriptionJobInfo], Any] | None = None
                                  ) -> TranscriptionJobResult:
        """Submit a job and poll until it completes (TimeoutError, or RuntimeError if it fails)."""
        job = await self.transcribe_async(file, model, language, prompt, response_format, temperature)
        started = time.monotonic()
        while True:
            info = await self.get_transcription_job(job.job_id)
            if on_progress is not None:
                on_progress(info)
            if _job_done(info, job.job_id, started, timeout):
                return await self.get_transcription_result(job.job_id)
            await asyncio.sleep(poll_interval)

    async def list_models(self) -> ListModelsResponse:
        """Every model in the registry, with aliases."""
        return await asyncio.to_thread(self.engine.list_models)

    async def get_model(self, model_id: str) -> ModelInfo:
        """One model by id or alias; NotFoundError if unknown."""
        return await asyncio.to_thread(self.engine.get_model, model_id)

    async def load_model(self, request: LoadModelRequest | dict[str, Any]) -> LoadModelResponse:
        """Load a model now rather than on its first request."""
        return await asyncio.to_thread(self.engine.load_model, request)

    async def unload_model(self, request: UnloadModelRequest | dict[str, Any]) -> UnloadModelResponse:
        """Unload a model and release its memory."""
        return await asyncio.to_thread(self.engine.unload_model, request)

    async def unload_all_models(self) -> UnloadAllModelsResponse:
        """Unload every loaded model."""
        return await asyncio.to_thread(self.engine.unload_all_models)

    async def get_model_status(self) -> ModelStatusResponse:
        """Which models are loaded, loading, unloaded or failed."""
        return await asyncio.to_thread(self.engine.get_model_status)

    async def get_gpu_status(self) -> GPUStatusResponse:
        """Devices, memory, utilisation and processes from NVML; zero GPUs on a CPU-only machine."""
        return await asyncio.to_thread(self.engine.get_gpu_status)

    async def get_gpu_memory(self) -> GPUMemoryResponse:
        """Memory per GPU."""
        return await asyncio.to_thread(self.engine.get_gpu_memory)

    async def purge_gpu(self, request: GPUPurgeRequest | dict[str, Any] | None = None) -> GPUPurgeResponse:
        """Unload models and report the memory released."""
        return await asyncio.to_thread(self.engine.purge_gpu, request)

    async def health(self) -> HealthResponse:
        """Whether the engine is serving."""
        return await asyncio.to_thread(self.engine.health)

    async def get_status(self) -> SystemStatus:
        """Per-model availability, latency and queue depth in the 'local' region."""
        return await asyncio.to_thread(self.engine.get_status)

    async def get_usage(self, start_date: str | None = None, end_date: str | None = None) -> UsageResponse:
        """Requests and tokens served by this engine since it started."""
        return await asyncio.to_thread(self.engine.get_usage, start_date, end_date)
