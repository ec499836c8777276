"""Speech and transcription on remote models: /audio/speech and /audio/transcriptions (or /translations)."""
from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pydantic
from polargrid import errors as sdk
from polargrid.types import TranscriptionResponse, TranslationResponse

from ..audio.encode import CONTENT_TYPES
from ..errors import engine_boundary
from ..runtime.stream import Stream
from ..speech.formats import VerboseTranscriptionResponse
from ..store.registry import ModelSpec
from .backend import RemoteBackend

if TYPE_CHECKING:
    from ..engine import LocalEngine

CHUNK = 16 * 1024


def upload(file: Any) -> tuple[str, bytes]:
    """(file name, bytes) of any audio input the local path accepts: a path, bytes or a file object."""
    if isinstance(file, (str, os.PathLike)):
        path = Path(file)
        return path.name, path.read_bytes()
    if isinstance(file, (bytes, bytearray, memoryview)):
        return getattr(file, "name", None) or "audio", bytes(file)
    data = file.read()
    if hasattr(file, "seek"):
        file.seek(0)  # a fallback to a local model reads it again
    return Path(getattr(file, "name", None) or "audio").name, data


class RemoteAudio:
    """Text-to-speech and speech-to-text forwarded to a remote that offers them."""

    def __init__(self, engine: LocalEngine) -> None:
        self.engine = engine

    def _backend(self, spec: ModelSpec):
        with engine_boundary("remote model"):
            return self.engine.pool.worker(spec)

    def speech_stream(self, spec: ModelSpec, request: Any, fmt: str) -> Stream[bytes]:
        """The remote's audio bytes as they arrive, in the requested format."""
        return self.engine.pool.tracked(spec, lambda: self._speech_stream(spec, request, fmt))

    def _speech_stream(self, spec: ModelSpec, request: Any, fmt: str) -> Stream[bytes]:
        worker, load_seconds = self._backend(spec)
        backend: RemoteBackend = worker.backend
        body = request.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        body.update(model=spec.remote.model, response_format=fmt)
        sent = time.perf_counter()
        response = backend.send("POST", "audio/speech", json=body)
        results, ctx = worker.read(backend.bytes(response, CHUNK))
        ctx.submitted_at = sent
        stream = Stream(results, ctx, lambda item: [item], load_seconds,
                        on_finish=lambda _s: self.engine.usage.record(spec.id, len(request.input)))
        stream.region = backend.region
        stream.content_type = CONTENT_TYPES.get(fmt, response.headers.get("Content-Type"))
        return stream

    def transcribe(self, spec: ModelSpec, file: Any, request: Any, fmt: str, words: bool, task: str):
        """The remote's transcript (or translation) in the requested response format."""
        with self.engine.pool.in_use(spec):
            return self._transcribe(spec, file, request, fmt, words, task)

    def _transcribe(self, spec: ModelSpec, file: Any, request: Any, fmt: str, words: bool, task: str):
        worker, _ = self._backend(spec)
        backend: RemoteBackend = worker.backend
        name, data = upload(file)
        fields = request.model_dump(mode="json", exclude_unset=True, exclude_none=True)
        fields.update(model=spec.remote.model, response_format=fmt)
        form: dict[str, Any] = {k: str(v) for k, v in fields.items() if not isinstance(v, (list, dict))}
        if words:
            form["timestamp_granularities[]"] = ["word"]
        path = "audio/translations" if task == "translate" else "audio/transcriptions"
        response = backend.send("POST", path, data=form, files={"file": (name, io.BytesIO(data))})
        try:
            body = response.read()
        except httpx.HTTPError as exc:
            raise backend._lost(exc) from exc
        finally:
            response.close()
        self.engine.usage.record(spec.id, 0)
        if fmt in ("text", "srt", "vtt"):
            return body.decode("utf-8", "replace")
        try:
            if fmt == "verbose_json":
                return VerboseTranscriptionResponse.model_validate_json(body)
            cls = TranslationResponse if task == "translate" else TranscriptionResponse
            return cls.model_validate_json(body)
        except pydantic.ValidationError as exc:
            raise sdk.ServerError(f"remote {backend.where} sent a transcript that is not OpenAI-compatible: "
                                  f"{exc.errors()[0].get('msg')}", 502) from exc

