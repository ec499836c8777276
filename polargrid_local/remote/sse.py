"""Server-sent events from an HTTP response body: one decoded JSON payload per ``data:`` event."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


class SSEFormatError(ValueError):
    """An event whose data is not JSON."""


def sse_payloads(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """JSON payloads of the events, in order, until ``data: [DONE]`` or the end of the body.

    Multi-line data is joined with newlines as the SSE spec says; comments (``:``) and
    ``event:``/``id:``/``retry:`` fields are skipped.
    """
    data: list[str] = []
    for line in lines:
        line = line.rstrip("\r")
        if line:
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            continue
        if not data:
            continue
        text, data = "\n".join(data), []
        if text == "[DONE]":
            return
        try:
            payload = json.loads(text)
        except ValueError:
            raise SSEFormatError(f"an event's data is not JSON: {text[:200]!r}") from None
        if isinstance(payload, dict):
            yield payload
    if data and "\n".join(data) != "[DONE]":
        try:
            payload = json.loads("\n".join(data))
        except ValueError:
            return
        if isinstance(payload, dict):
            yield payload
