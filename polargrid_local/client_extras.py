"""Local extras of PolarGrid and PolarGridSync beyond the SDK's methods: OpenAI's Responses API and rerank.

Mixed into the clients of client.py; each is a thin call into the engine, as the SDK's methods are.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from .errors import ServerError
from .llm.rerank import RerankResponse
from .llm.responses import ResponseEvent, ResponseObject, ResponseStream, fold_response, open_response


class SyncExtras:
    """PolarGridSync's local extras."""

    engine: Any

    def responses(self, request: dict[str, Any]) -> ResponseObject | ResponseStream:
        """OpenAI's Responses API: ``{"model", "input", "instructions", "tools", "text", ...}``. The response (the
        fold of its stream), or with ``"stream": True`` the stream of Responses events."""
        stream = open_response(self.engine, request)
        return stream if stream.streaming else fold_response(stream)

    def responses_stream(self, request: dict[str, Any]) -> ResponseStream:
        """The Responses events of one request as they are generated; close the stream to stop it."""
        return open_response(self.engine, request)

    def rerank(self, request: dict[str, Any]) -> RerankResponse:
        """Documents ordered by relevance to a query: ``{"model", "query", "documents", "top_n",
        "return_documents"}`` (Cohere's and Jina's shape)."""
        return self.engine.rerank(request)


class AsyncExtras:
    """PolarGrid's local extras: the same calls, off the event loop."""

    engine: Any

    async def responses(self, request: dict[str, Any]) -> ResponseObject:
        """OpenAI's Responses API (the fold of ``responses_stream``)."""
        stream = await asyncio.to_thread(open_response, self.engine, {**request, "stream": False})
        with stream:
            async for _ in stream:
                pass
        if stream.response is None:
            raise ServerError("the response stream ended without a final response", 500)
        return stream.response

    async def responses_stream(self, request: dict[str, Any]) -> AsyncIterator[ResponseEvent]:
        """The Responses events of one request; leaving the loop stops the generation."""
        stream = await asyncio.to_thread(open_response, self.engine, request)
        try:
            async for event in stream:
                yield event
        finally:
            stream.close()

    async def rerank(self, request: dict[str, Any]) -> RerankResponse:
        """Documents ordered by relevance to a query (Cohere's and Jina's shape)."""
        return await asyncio.to_thread(self.engine.rerank, request)
