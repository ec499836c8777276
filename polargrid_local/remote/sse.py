"""What a remote sends, read within bounds: its bytes counted, its event stream split into lines and events
no longer than the model's ``[models.remote]`` bounds, and its JSON read with no NaN or Infinity."""
from __future__ import annotations

import json
import math
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
        return _DECODER.decode(data if isinstance(data, str) else data.decode("utf-8"))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_DECODER = json.JSONDecoder(parse_constant=_no_number, parse_float=_finite_or_none)   # made once: json.loads
#                                                                     would make one per call with these hooks


def counted(chunks: Iterable[bytes], bound: int) -> Iterator[bytes]:
    """``chunks`` as they arrive, ended with BoundExceeded once they add up to more than ``bound`` bytes."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > bound:
            raise BoundExceeded("an answer", bound, "max_response_bytes")
        yield chunk


def lines(chunks: Iterable[bytes], max_line: int) -> Iterator[bytes]:
    """The lines of a byte stream (ended by CRLF, LF or CR, as the SSE spec allows), without their ends.
    A line longer than ``max_line`` bytes is refused as it arrives, before it is whole."""
    too_long = BoundExceeded("an event-stream line", max_line, "max_sse_line_bytes")
    pending = b""
    for chunk in chunks:
        parts = (pending + chunk if pending else chunk).splitlines(keepends=True)
        # The last part waits for more: it has no line end yet, or ends in a CR whose LF may come next.
        pending = parts.pop() if parts and parts[-1][-1:] != b"\n" else b""
        for part in parts:
            line = part.rstrip(b"\r\n")   # one line end: splitlines ends each part at the first
            if len(line) > max_line:
                raise too_long
            yield line
        if len(pending) > max_line + 1:   # + 1: a CR waiting for its LF
            raise too_long
    if pending:
        line = pending.rstrip(b"\r\n")
        if len(line) > max_line:
            raise too_long
        yield line


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
