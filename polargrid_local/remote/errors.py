"""A remote server's failures as the SDK's error classes, keeping the remote's own message, with the remote's key
taken out and its length capped (a remote that echoes the Authorization header must not hand our key on)."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable
from email.utils import parsedate_to_datetime
from typing import Any, TypeGuard

from polargrid import errors as sdk

MESSAGE_CHARS = 500       # the most of a remote's message passed on
ERROR_BODY_BYTES = 64 * 1024   # the most of an error body read (the rest is not wanted; its connection is dropped)
REDACTED = "[redacted]"


def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` without any of ``secrets`` (as written, or JSON-escaped), cut to MESSAGE_CHARS."""
    for secret in secrets:
        if secret:
            for form in {secret, json.dumps(secret)[1:-1]}:
                text = text.replace(form, REDACTED)
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS - 1] + "…"


def remote_message(body: bytes) -> tuple[str, Any]:
    """The human message in an error body (OpenAI, vLLM, FastAPI and PolarGrid shapes) and its field, if any."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return (text or "(empty body)"), None
    if not isinstance(data, dict):
        return text, None
    error = data.get("error")
    if isinstance(error, dict) and error.get("message"):
        param = error.get("param")
        return str(error["message"]), param if isinstance(param, str) else None
    if isinstance(error, str) and error:
        return error, None
    if data.get("message"):
        return str(data["message"]), None
    detail = data.get("detail")
    if detail:
        return (detail if isinstance(detail, str) else json.dumps(detail)), None
    return text, None


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def error_for_status(status: int, body: bytes, retry_after: float | None, where: str,
                     secrets: Iterable[str] = ()) -> sdk.PolarGridError:
    """The SDK error a remote HTTP status stands for; the message is the remote's (scrubbed of ``secrets`` and
    capped), then where it came from."""
    message, param = remote_message(body)
    text = f"{scrub(message, secrets)} (remote {where}, HTTP {status})"
    param = scrub(param, secrets) if param else None
    if status in (400, 413, 422):
        return sdk.ValidationError(text, {"field": param, "remote_status": status} if param else
                                   {"remote_status": status})
    if status in (401, 403):
        return sdk.AuthenticationError(text)
    if status == 402:
        return sdk.BillingError(text)
    if status == 404:
        return sdk.NotFoundError(text)
    if status == 408:
        return sdk.TimeoutError(text)
    if status == 429:
        wait = None if retry_after is None else max(1, round(min(retry_after, 86400.0)))
        return sdk.RateLimitError(text, retry_after=wait)
    if 500 <= status <= 599:
        return sdk.ServerError(text, status)
    if status >= 600:   # not an HTTP status: the remote is broken
        return sdk.ServerError(text, 502)
    return sdk.ValidationError(text, {"remote_status": status})


def error_in_stream(payload: dict[str, Any], where: str, secrets: Iterable[str] = ()) -> sdk.PolarGridError:
    """An error frame sent after the stream began (``data: {"error": ...}``)."""
    error = payload.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    # Without a status of its own, the remote's failure is ours to report as a bad gateway.
    status = next((s for s in (payload.get("status"), code) if _status(s)), 502)
    return error_for_status(status, json.dumps(payload).encode(), None, where, secrets)


def _status(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599
