"""A remote server's failures as the SDK's error classes, keeping the remote's own message."""
from __future__ import annotations

import json
import time
from email.utils import parsedate_to_datetime
from typing import Any

from polargrid import errors as sdk


def remote_message(body: bytes) -> tuple[str, Any]:
    """The human message in an error body (OpenAI, vLLM, FastAPI and PolarGrid shapes) and its field, if any."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return (text[:500] or "(empty body)"), None
    if not isinstance(data, dict):
        return text[:500], None
    error = data.get("error")
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"]), error.get("param")
    if isinstance(error, str) and error:
        return error, None
    if data.get("message"):
        return str(data["message"]), None
    detail = data.get("detail")
    if detail:
        return (detail if isinstance(detail, str) else json.dumps(detail)), None
    return text[:500], None


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: either a number or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_for_status(status: int, body: bytes, retry_after: float | None, where: str) -> sdk.PolarGridError:
    """The SDK error a remote HTTP status stands for; the message is the remote's, then where it came from."""
    message, param = remote_message(body)
    text = f"{message} (remote {where}, HTTP {status})"
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
        return sdk.RateLimitError(text, retry_after=None if retry_after is None else max(1, round(retry_after)))
    if status >= 500:
        return sdk.ServerError(text, status)
    return sdk.ValidationError(text, {"remote_status": status})


def error_in_stream(payload: dict[str, Any], where: str) -> sdk.PolarGridError:
    """An error frame sent after the stream began (``data: {"error": ...}``)."""
    status = payload.get("status")
    error = payload.get("error")
    if not isinstance(status, int) and isinstance(error, dict) and isinstance(error.get("code"), int):
        status = error["code"]
    return error_for_status(status if isinstance(status, int) else 500, json.dumps(payload).encode(), None, where)
