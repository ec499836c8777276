"""What a remote sends, read within bounds: its bytes counted, its event stream split into lines and events
no longer than the model's ``[models.remote]`` bounds, and its JSON read with no NaN or Infinity."""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from typing import Any


class SSEFormatError(ValueError):
    """An event whose data is not JSON (or not UTF-8)."""


class BoundExceeded(ValueError):
    """The remote sent more than one of its bounds allows; ``setting`` names the ``[models.remote]`` key."""

    def __init__(self, what: str, bound: int, setting: str) -> None:
        super().__init__(f"{what} longer than {bound} bytes (remote.{setting})")
        self.setting = setting


def _no_number(name: str) -> None:
    return None


def _finite_or_none(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def finite_json(data: str | bytes) -> Any:
    """JSON with ``NaN``, ``Infinity`` and numbers past a float's range read as null. Python's parser takes them
    as floats, which would reach our callers as invalid JSON; as null, a field that needs a number refuses
    them (a vector is a 502) and one that can do without (usage) does without. Nesting deeper than Python's
    stack is a ValueError, as malformed JSON is."""
    try:
        return json.loads(data, parse_constant=_no_number, parse_float=_finite_or_none)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def counted(chunks: Iterable[bytes], bound: int) -> Iterator[bytes]:
    """``chunks`` as they arrive, ended with BoundExceeded once they add up to more than ``bound`` bytes."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > bound:
            raise BoundExceeded("an answer", bound, "max_response_bytes")
        yield chunk


_LINE_END = re.compile(rb"\r\n|\r|\n")


def lines(chunks: Iterable[bytes], max_line: int) -> Iterator[bytes]:
    """The lines of a byte stream (ended by CRLF, LF or CR, as the SSE spec allows), without their ends.
    A line longer than ``max_line`` bytes is refused as it arrives, before it is whole."""
    too_long = BoundExceeded("an event-stream line", max_line, "max_sse_line_bytes")
    pending = b""
    for chunk in chunks:
        data = pending + chunk
        start = 0
        for end in _LINE_END.finditer(data):
            if end.group() == b"\r" and end.end() == len(data):
                break    # a CR that ends this chunk may be the first half of a CRLF
            if end.start() - start > max_line:
                raise too_long
            yield data[start:end.start()]
            start = end.end()
        pending = data[start:]
        if len(pending) > max_line + 1:   # + 1: a CR waiting for its LF
            raise too_long
    if len(pending.rstrip(b"\r")) > max_line:
        raise too_long
    if pending:
        yield pending.rstrip(b"\r")


def sse_payloads(stream_lines: Iterable[bytes], max_event: int) -> Iterator[dict[str, Any]]:
    """JSON payloads of the events, in order, until ``data: [DONE]`` or the end of the body.

    Multi-line data is joined with newlines as the SSE spec says; comments (``:``) and
    ``event:``/``id:``/``retry:`` fields are skipped, but count towards the event's size, which
    ``max_event`` bounds (an event that never ends would otherwise grow without end).
    """
    data: list[bytes] = []
    size = 0
    for line in stream_lines:
        if line:
            size += len(line) + 1
            if size > max_event:
                raise BoundExceeded("an event", max_event, "max_sse_event_bytes")
            if line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            continue
        size = 0
        if not data:
            continue
        text, data = b"\n".join(data), []
        if text == b"[DONE]":
            return
        payload = _event(text)
        if isinstance(payload, dict):
            yield payload
    if data and b"\n".join(data) != b"[DONE]":
        try:
            payload = _event(b"\n".join(data))
        except SSEFormatError:
            return    # an event cut off by the end of the body
        if isinstance(payload, dict):
            yield payload


def _event(text: bytes) -> Any:
    try:
        return finite_json(text.decode("utf-8"))
    except ValueError:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SSEFormatError(f"an event's data is not JSON: {text[:200].decode('utf-8', 'replace')!r}") from None
