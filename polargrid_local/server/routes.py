"""Every route of the PolarGrid REST API that polargrid-sdk 0.10.0 (and the openai client) calls."""
from __future__ import annotations

import base64
import json
import re
from typing import Any, Callable, Iterator
from urllib.parse import unquote

import numpy as np
from polargrid import errors as sdk
from polargrid.types import TranscriptionJobStatus

from ..audio.encode import CONTENT_TYPES
from ..engine import LocalEngine
from ..errors import invalid
from .app import Request, Response, StreamingResponse, error_body, error_status, json_response


class Routes:
    """(method, path pattern) -> route function; knows which methods a path allows."""

    def __init__(self) -> None:
        self._table: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = []

    def add(self, method: str, pattern: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            self._table.append((method, re.compile(f"^{pattern}$"), fn))
            return fn
        return register

    def match(self, method: str, path: str):
        allowed = []
        for route_method, pattern, fn in self._table:
            found = pattern.match(path)
            if found:
                if route_method == method or (method == "HEAD" and route_method == "GET"):
                    return fn, {k: unquote(v) for k, v in found.groupdict().items()}, allowed
                allowed.append(route_method)
        return None, {}, sorted(set(allowed))


ROUTES = Routes()
_NONE = object()


# -- streaming helpers ---------------------------------------------------------------------

def _frame(payload: Any) -> bytes:
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json", exclude_none=True)
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _primed(stream) -> Iterator[Any]:
    """The stream's first item is read now, so a bad request fails before the 200 goes out; then the rest.
    Closing the returned iterator closes the stream, which stops the work behind it."""
    first = next(iter(stream), _NONE)

    def items() -> Iterator[Any]:
        try:
            if first is not _NONE:
                yield first
            yield from stream
        finally:
            stream.close()

    return items()


def sse(stream) -> StreamingResponse:
    """Server-sent events, with an error frame if the work fails after streaming began."""
    items = _primed(stream)

    def frames() -> Iterator[bytes]:
        try:
            for item in items:
                yield _frame(item)
        except sdk.PolarGridError as exc:
            status, kind = error_status(exc)
            yield _frame(error_body(exc, status, kind))
        finally:
            items.close()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(frames())


# -- text ----------------------------------------------------------------------------------

def _chat_body(request: Request) -> dict[str, Any]:
    body = request.json()
    if body.get("n", 1) != 1:
        raise invalid("n must be 1: one choice per request", field="n")
    if "max_tokens" not in body and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]
    return body


@ROUTES.add("POST", "/v1/chat/completions")
def chat_completions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    body = _chat_body(request)
    if body.pop("stream", False):
        return sse(engine.chat_completion_stream(body))
    body.pop("stream_options", None)
    return json_response(engine.chat_completion(body))


@ROUTES.add("POST", "/v1/completions")
def completions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    body = request.json()
    if body.pop("stream", False):
        return sse(engine.completion_stream(body))
    body.pop("stream_options", None)
    return json_response(engine.completion(body))


@ROUTES.add("POST", "/v1/completions/stream")
def completions_stream(engine: LocalEngine, request: Request) -> StreamingResponse:
    body = request.json()
    body.pop("stream", None)
    return sse(engine.completion_stream(body))


@ROUTES.add("POST", "/v1/embeddings")
def embeddings(engine: LocalEngine, request: Request) -> Response:
    body = request.json()
    result = engine.embeddings(body).model_dump(mode="json")  # checks dimensions and encoding_format
    if body.get("encoding_format") == "base64":  # what the openai client asks for by default
        for item in result["data"]:
            item["embedding"] = base64.b64encode(np.asarray(item["embedding"], "<f4").tobytes()).decode()
    return json_response(result)


# -- audio ---------------------------------------------------------------------------------

@ROUTES.add("POST", "/v1/audio/speech")
def speech(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    body = request.json()
    streaming = bool(body.pop("stream", False))
    for extra in ("instructions", "stream_format", "voice_transcript", "language"):
        body.pop(extra, None)
    if streaming:
        stream = engine.text_to_speech_stream(body)
        return StreamingResponse(_primed(stream), content_type=stream.content_type)
    fmt = str(body.get("response_format") or "mp3").lower()
    return Response(200, engine.text_to_speech(body), content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"))


def _stt_fields(request: Request) -> tuple[bytes, str, dict[str, Any], bool]:
    form = request.form()
    file = form.get("file")
    if file is None or file.filename is None and not file.data:
        raise invalid("the multipart body needs a 'file' part", field="file")
    fields: dict[str, Any] = {k: v.data.decode("utf-8", "replace") for k, v in form.items() if k != "file"}
    granularities = [v.data.decode() for k, v in form.items() if k in ("timestamp_granularities[]",
                                                                       "timestamp_granularities")]
    params = {**request.query, **fields}
    in_form = "model" in fields
    params.pop("sync", None)
    if granularities:
        params["timestamp_granularities"] = granularities
    if "temperature" in params and params["temperature"] not in (None, ""):
        try:
            params["temperature"] = float(params["temperature"])
        except ValueError:
            raise invalid("temperature must be a number", field="temperature") from None
    return file.data, file.filename or "audio", params, in_form


def _transcript_response(result: Any) -> Response:
    if isinstance(result, str):
        return Response(200, result.encode(), content_type="text/plain; charset=utf-8")
    return json_response(result)


@ROUTES.add("POST", "/v1/audio/transcriptions")
def transcriptions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    data, filename, params, in_form = _stt_fields(request)
    stream = str(params.pop("stream", "")).lower() in ("true", "1")
    if stream:
        return sse(engine.transcribe_stream(data, params))
    if request.query.get("sync", "").lower() in ("true", "1") or in_form or request.query.get("model") is None:
        return _transcript_response(engine.transcribe(data, params))
    job = engine.transcribe_async(_Named(data, filename), params.get("model", "stt-1b-en_fr"),
                                  params.get("language"), params.get("prompt"),
                                  params.get("response_format", "json"), params.get("temperature"))
    return json_response(job, 202)


@ROUTES.add("GET", "/v1/audio/transcriptions")
def transcription_job(engine: LocalEngine, request: Request) -> Response:
    job_id = request.query.get("job_id")
    if not job_id:
        raise invalid("job_id is required: GET /v1/audio/transcriptions?job_id=...", field="job_id")
    return _job_payload(engine, job_id)


def _job_payload(engine: LocalEngine, job_id: str) -> Response:
    """Job status, with the result's fields once completed (the SDK reads both from this one URL)."""
    info = engine.get_transcription_job(job_id)
    payload = info.model_dump(mode="json")
    if info.status == TranscriptionJobStatus.COMPLETED:
        payload.update(engine.get_transcription_result(job_id).model_dump(mode="json"))
        return json_response(payload)
    return json_response(payload, 202 if info.status != TranscriptionJobStatus.FAILED else 200)


@ROUTES.add("GET", "/v1/audio/transcriptions/jobs")
def transcription_jobs(engine: LocalEngine, request: Request) -> Response:
    try:
        limit = int(request.query.get("limit", 50))
    except ValueError:
        raise invalid("limit must be an integer", field="limit") from None
    return json_response(engine.list_transcription_jobs(request.query.get("status"), limit))


@ROUTES.add("GET", "/v1/audio/transcriptions/jobs/(?P<job_id>[^/]+)")
def transcription_job_by_path(engine: LocalEngine, request: Request, job_id: str) -> Response:
    return json_response(engine.get_transcription_job(job_id))


@ROUTES.add("GET", "/v1/audio/transcriptions/jobs/(?P<job_id>[^/]+)/result")
def transcription_job_result(engine: LocalEngine, request: Request, job_id: str) -> Response:
    return json_response(engine.get_transcription_result(job_id))


@ROUTES.add("POST", "/v1/audio/translations")
def translations(engine: LocalEngine, request: Request) -> Response:
    data, _filename, params, _in_form = _stt_fields(request)
    params.pop("language", None)
    return _transcript_response(engine.translate(data, params))


class _Named(bytes):
    """Upload bytes that remember their file name (jobs report it)."""

    def __new__(cls, data: bytes, name: str):
        obj = super().__new__(cls, data)
        obj.name = name
        return obj


# -- models, GPU, health -------------------------------------------------------------------

@ROUTES.add("GET", "/v1/models")
def list_models(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.list_models())


@ROUTES.add("GET", "/v1/models/status")
def model_status(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_model_status())


@ROUTES.add("POST", "/v1/models/load")
def load_model(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.load_model(request.json()))


@ROUTES.add("POST", "/v1/models/unload")
def unload_model(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.unload_model(request.json()))


@ROUTES.add("POST", "/v1/models/unload-all")
def unload_all(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.unload_all_models())


@ROUTES.add("GET", "/v1/models/(?P<model_id>.+)")
def get_model(engine: LocalEngine, request: Request, model_id: str) -> Response:
    return json_response(engine.get_model(model_id))


@ROUTES.add("GET", "/v1/gpu/status")
def gpu_status(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_gpu_status())


@ROUTES.add("GET", "/v1/gpu/memory")
def gpu_memory(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_gpu_memory())


@ROUTES.add("POST", "/v1/gpu/purge")
def gpu_purge(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.purge_gpu(request.json() if request.body else None))


@ROUTES.add("GET", "/health")
def health(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.health())


@ROUTES.add("GET", "/v1/status")
def status(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_status())


@ROUTES.add("GET", "/v1/usage")
def usage(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_usage(request.query.get("start_date"), request.query.get("end_date")))
