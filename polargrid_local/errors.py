"""Turning failures into polargrid-sdk's own error classes, at the boundary.

Callers only ever see ``polargrid`` errors: bad input is ValidationError (400), an
unknown or unpulled model NotFoundError (404), a full queue RateLimitError (429),
and anything the engines raise ServerError (500).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pydantic
from polargrid import errors as sdk

logger = logging.getLogger("polargrid_local")

ValidationError = sdk.ValidationError
NotFoundError = sdk.NotFoundError
ServerError = sdk.ServerError
RateLimitError = sdk.RateLimitError
PolarGridError = sdk.PolarGridError
TimeoutError = sdk.TimeoutError


def invalid(message: str, **details: Any) -> sdk.ValidationError:
    """A ValidationError whose message names the problem; details carry the field."""
    return sdk.ValidationError(message, details or None)


def from_pydantic(err: pydantic.ValidationError, what: str) -> sdk.ValidationError:
    """Condense pydantic's report into one readable line per problem."""
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item.get("loc", ())) or what
        problems.append(f"{where}: {item.get('msg', 'invalid')}")
    return sdk.ValidationError(f"Invalid {what}: " + "; ".join(problems), {"errors": problems})


def coerce(model_cls: type[pydantic.BaseModel], request: Any, what: str) -> Any:
    """Accept the SDK's request object or a dict, as the SDK does; raise the SDK's ValidationError."""
    if isinstance(request, model_cls):
        return request
    if not isinstance(request, dict):
        raise sdk.ValidationError(f"{what} must be a {model_cls.__name__} or a dict, not {type(request).__name__}")
    check_text(request)
    try:
        return model_cls.model_validate(request)
    except pydantic.ValidationError as err:
        raise from_pydantic(err, what) from err


@contextlib.contextmanager
def engine_boundary(what: str) -> Iterator[None]:
    """Let SDK errors through; turn any other exception from an engine into ServerError."""
    try:
        yield
    except sdk.PolarGridError:
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except Exception as exc:
        logger.exception("%s failed", what)
        raise as_server_error(exc, what) from exc


def as_server_error(exc: BaseException, what: str) -> sdk.PolarGridError:
    if isinstance(exc, sdk.PolarGridError):
        return exc
    return sdk.ServerError(f"{what} failed: {type(exc).__name__}: {exc}", 500)


def check_text(value: Any, field: str = "", *, max_depth: int | None = None) -> None:
    """Raise a ValidationError naming the field if any string in ``value`` (nested dicts and lists included,
    keys too) is not valid Unicode, such as a lone UTF-16 surrogate (``"\\ud800"``), which no tokenizer
    or encoder can take; or if the nesting is deeper than ``max_depth``. Iterative, so any depth is safe."""
    stack = [(value, field, 0)]
    while stack:
        item, where, depth = stack.pop()
        if max_depth is not None and depth > max_depth:
            raise invalid(f"{where or 'the request'} is nested more than {max_depth} levels deep",
                          field=where or None)
        if isinstance(item, str):
            if not _is_unicode(item):
                raise invalid(f"{where or 'the request'} is not valid Unicode (it contains a lone surrogate)",
                              field=where or None)
        elif isinstance(item, dict):
            for key, child in item.items():
                name = str(key)
                if not _is_unicode(name):
                    raise invalid(f"a key in {where or 'the request'} is not valid Unicode", field=where or None)
                stack.append((child, f"{where}.{name}" if where else name, depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
