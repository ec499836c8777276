"""Every route of the PolarGrid REST API that polargrid-sdk 0.10.0 (and the openai client) calls."""
from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Generator, Iterator
from typing import Any
from urllib.parse import unquote

import numpy as np
from polargrid import errors as sdk
from polargrid.types import TranscriptionJobStatus

from ..audio.encode import CONTENT_TYPES
from ..engine import LocalEngine
from ..errors import invalid
from .app import Request, Response, StreamingResponse, error_body, error_status, json_bytes, json_response
from .watch import ClientGone


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
        allowed: list[str] = []
        for route_method, pattern, fn in self._table:
            found = pattern.match(path)
            if found:
                if route_method == method or (method == "HEAD" and route_method == "GET"):
                    return fn, {k: unquote(v) for k, v in found.groupdict().items()}, allowed
                allowed.append(route_method)
        return None, {}, sorted(set(allowed))

    def label(self, method: str, path: str) -> str:
        """The pattern of the route that serves this request ("unmatched" if none): a bounded metrics label."""
        for route_method, pattern, _ in self._table:
            if pattern.match(path) and (route_method == method or (method == "HEAD" and route_method == "GET")):
                return pattern.pattern[1:-1]
        return "unmatched"


ROUTES = Routes()
_NONE = object()


# -- fields a route reads itself, and streams watched for their client --------------------

_KINDS = {bool: "a boolean (true or false)", int: "an integer", dict: "an object", str: "a string"}


def _take(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """Pop a field this route interprets itself, of exactly ``kind`` (JSON null: the default); anything
    else is a 400 naming the field, so ``"stream": "x"`` never starts a stream."""
    value = body.pop(name, None)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise invalid(f"{name} must be {_KINDS[kind]}", field=name)
    return value


def _watched(stream, request: Request) -> Generator[Any, None, None]:
    """The stream's first item is read now, so a bad request fails before the 200 goes out; then the rest.
    The stream is closed when its client leaves, and closing the returned iterator closes it too; a stream
    stopped by a shutdown ends by raising the 503 (an error frame, or an incomplete byte stream)."""
    client = request.client
    client.add(stream)
    try:
        first = next(iter(stream), _NONE)
        client.raise_if_stopped()
    except BaseException:
        client.discard(stream)
        stream.close()
        raise

    def items() -> Generator[Any, None, None]:
        try:
            if first is not _NONE:
                yield first
            yield from stream
            client.raise_if_stopped()
        finally:
            stream.close()
            client.discard(stream)

    return items()


def _frame(payload: Any) -> bytes:
    if hasattr(payload, "model_dump"):
        payload = payload.model_dump(mode="json", exclude_none=True)
    return b"data: " + json_bytes(payload) + b"\n\n"


def sse(stream, request: Request) -> StreamingResponse:
    """Server-sent events, with an error frame if the work fails (or is stopped) after streaming began."""
    items = _watched(stream, request)

    def frames() -> Iterator[bytes]:
        try:
            for item in items:
                yield _frame(item)
        except ClientGone:
            return
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
    if _take(body, "n", int, 1) != 1:
        raise invalid("n must be 1: one choice per request", field="n")
    if "max_tokens" not in body and body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body["max_completion_tokens"]
    return body


@ROUTES.add("POST", "/v1/chat/completions")
def chat_completions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    body = _chat_body(request)
    options = _take(body, "stream_options", dict)
    if _take(body, "stream", bool, False):
        return sse(engine.chat_completion_stream(body, stream_options=options), request)
    with request.client.watch() as watch:  # the fold of the stream, stopped if the client leaves
        return json_response(engine.fold(watch(engine.chat_completion_stream(body,
                                                                              stream_options={"include_usage": True}))))


def _completion_body(request: Request) -> tuple[dict[str, Any], dict[str, Any] | None, int | None]:
    body = request.json()
    if _take(body, "n", int, 1) != 1:
        raise invalid("n must be 1: one choice per prompt", field="n")
    return body, _take(body, "stream_options", dict), _take(body, "seed", int)


@ROUTES.add("POST", "/v1/completions")
def completions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    body, options, seed = _completion_body(request)
    if _take(body, "stream", bool, False):
        return sse(engine.completion_stream(body, stream_options=options, seed=seed), request)
    with request.client.watch() as watch:
        return json_response(engine.fold(watch(engine.completion_stream(body, stream_options={"include_usage": True},
                                                                        seed=seed))))


@ROUTES.add("POST", "/v1/completions/stream")
def completions_stream(engine: LocalEngine, request: Request) -> StreamingResponse:
    body, options, seed = _completion_body(request)
    _take(body, "stream", bool)
    return sse(engine.completion_stream(body, stream_options=options, seed=seed), request)


@ROUTES.add("POST", "/v1/cache/prompt")
def cache_prompt(engine: LocalEngine, request: Request) -> Response:
    """A local extra: process a prompt now and keep its KV state in the prompt cache, pinned."""
    return json_response(engine.cache_prompt(request.json()))


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
    streaming = _take(body, "stream", bool, False)
    for extra in ("instructions", "stream_format", "voice_transcript", "language"):
        body.pop(extra, None)
    if streaming:
        stream = engine.text_to_speech_stream(body)
        return StreamingResponse(_bytes(_watched(stream, request)),
                                 content_type=stream.content_type or "application/octet-stream")
    fmt = str(body.get("response_format") or "mp3").lower()
    return Response(200, engine.text_to_speech(body), content_type=CONTENT_TYPES.get(fmt, "application/octet-stream"))


def _bytes(items: Generator[bytes, None, None]) -> Iterator[bytes]:
    """A byte stream whose client left just ends (there is nobody to tell)."""
    try:
        yield from items
    except ClientGone:
        return
    finally:
        items.close()


def _text(part) -> str:
    try:
        return part.data.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(f"multipart field {part.name!r} is not UTF-8 text", field=part.name) from None


def _form_bool(params: dict[str, Any], name: str) -> bool:
    value = str(params.pop(name, "") or "").strip().lower()
    if value not in ("", "true", "1", "false", "0"):
        raise invalid(f"{name} must be true or false", field=name)
    return value in ("true", "1")


def _stt_fields(request: Request) -> tuple[bytes, str, dict[str, Any], bool]:
    form = request.form()
    file = form.get("file")
    if file is None or file.filename is None and not file.data:
        raise invalid("the multipart body needs a 'file' part", field="file")
    fields: dict[str, Any] = {k: _text(v) for k, v in form.items() if k != "file"}
    granularities = [fields.pop(k) for k in ("timestamp_granularities[]", "timestamp_granularities") if k in fields]
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
        if not math.isfinite(params["temperature"]):
            raise invalid("temperature must be a finite number", field="temperature")
    return file.data, file.filename or "audio", params, in_form


def _transcript_response(result: Any) -> Response:
    if isinstance(result, str):
        return Response(200, result.encode(), content_type="text/plain; charset=utf-8")
    return json_response(result)


@ROUTES.add("POST", "/v1/audio/transcriptions")
def transcriptions(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    data, filename, params, in_form = _stt_fields(request)
    if _form_bool(params, "stream"):
        return sse(engine.transcribe_stream(data, params), request)
    if request.query.get("sync", "").lower() in ("true", "1") or in_form or request.query.get("model") is None:
        with request.client.watch() as watch:
            result = engine.transcribe(data, params, on_open=watch)
        return _transcript_response(result)
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
    with request.client.watch() as watch:
        result = engine.translate(data, params, on_open=watch)
    return _transcript_response(result)


class _Named(bytes):
    """Upload bytes that remember their file name (jobs report it)."""

    name: str

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
    payload = engine.health().model_dump(mode="json")
    payload["node"] = "local"  # an open route: it does not name the host
    return json_response(payload)


@ROUTES.add("GET", "/v1/status")
def status(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_status())


@ROUTES.add("GET", "/v1/usage")
def usage(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.get_usage(request.query.get("start_date"), request.query.get("end_date")))
