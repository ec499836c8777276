"""Routes beyond the SDK's: OpenAI's Responses API and rerank (Cohere/Jina shape).

The metrics route is in metrics.py and the playground's in playground.py; all register on routes.ROUTES.
"""
from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import cast

from polargrid import errors as sdk

from ..engine import LocalEngine
from ..llm.responses import ResponseEvent, ResponseStream, fold_response, open_response
from .app import Request, Response, StreamingResponse, error_body, error_status, json_response
from .routes import ROUTES, _watched
from .watch import ClientGone


def _event(event: ResponseEvent) -> bytes:
    """One Responses event as OpenAI frames it: its type as the SSE event name, the event as data."""
    return f"event: {event.type}\ndata: {json.dumps(event.model_dump(mode='json'))}\n\n".encode()


@ROUTES.add("POST", "/v1/responses")
def responses(engine: LocalEngine, request: Request) -> Response | StreamingResponse:
    stream = open_response(engine, request.json())
    if stream.streaming:
        return StreamingResponse(_frames(stream, request))
    with request.client.watch() as watch:  # the fold of the stream, stopped if the client leaves
        response = fold_response(watch(stream))
    return json_response(response)


def _frames(stream: ResponseStream, request: Request) -> Iterator[bytes]:
    """Server-sent events; a failure after the first event becomes ``error`` and ``response.failed`` events."""
    items = cast(Generator[ResponseEvent, None, None], _watched(stream, request))

    def frames() -> Iterator[bytes]:
        try:
            for event in items:
                yield _event(event)
        except ClientGone:
            return
        except sdk.PolarGridError as exc:
            status, kind = error_status(exc)
            code = error_body(exc, status, kind)["code"]
            for event in stream.translator.fail(exc, code):
                yield _event(event)
        finally:
            items.close()

    return frames()


@ROUTES.add("POST", "/v1/rerank")
def rerank_documents(engine: LocalEngine, request: Request) -> Response:
    return json_response(engine.rerank(request.json()).model_dump(mode="json", exclude_none=True))
