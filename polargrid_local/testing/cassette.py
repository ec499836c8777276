"""Record a client's requests and responses (streams as their chunks, errors too) and replay them.

    cassette = Cassette("tests/cassettes/summary.json")
    client = cassette.record(PolarGridSync())          # or the remote SDK's polargrid.PolarGrid(...)
    ...                                                 # every call is written to the file as it happens
    client = cassette.replay()                          # later, offline: the same answers, same order

Works with PolarGridSync, PolarGrid (async) and polargrid.PolarGrid. A request is matched by method and
arguments (request objects and dicts by their fields, audio files by their sha256); the same request
made again gets the next recorded answer, then the last one again. A request the cassette does not
hold raises CassetteMiss naming it.

A cassette is data, never code: the types it names (``$model``, an error's ``class``) are looked up in a
fixed allowlist (the SDK's types and errors, polargrid_local's own types and errors; ALLOWED_MODULES), and
nothing a file names is ever imported. Anything else is refused with CassetteError when replay starts.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import importlib
import inspect
import json
import os
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
from polargrid import errors as sdk
from pydantic import BaseModel

_PASS_THROUGH = ("close", "aclose")


class CassetteMiss(LookupError):
    """The replayed client was asked something the cassette has no recording of."""


class CassetteError(ValueError):
    """A cassette file names a type outside the allowlist (or is not shaped like a cassette)."""


# The only modules whose classes a cassette may name: fixed here, never taken from a file.
ALLOWED_MODULES = ("polargrid.types", "polargrid.errors", "polargrid_local.types", "polargrid_local.speech.formats",
                   "polargrid_local.testing.chat", "polargrid_local.server.framing",
                   "polargrid_local.host.llama_safety")


class Cassette:
    """One JSON file of recorded interactions."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.asynchronous = False
        self.interactions: list[dict[str, Any]] = []
        if self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.asynchronous = bool(data.get("async"))
            self.interactions = list(data.get("interactions", []))

    def record(self, client: Any) -> Recorder:
        """A wrapper of ``client`` that records every call into this cassette (starting it afresh)."""
        self.interactions = []
        self.asynchronous = inspect.iscoroutinefunction(getattr(client, "chat_completion", None))
        self.save()
        return Recorder(client, self)

    def replay(self) -> Replayer:
        """A client answering from the recordings alone: no engine, no network."""
        if not self.path.exists():
            raise CassetteMiss(f"no cassette at {self.path}; record one with Cassette(path).record(client)")
        return Replayer(self)

    def add(self, interaction: dict[str, Any]) -> None:
        self.interactions.append(interaction)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": "polargrid-cassette/1", "async": self.asynchronous, "interactions": self.interactions}
        self.path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")


# -- requests as keys ------------------------------------------------------------------------

def _canonical(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _canonical(value.model_dump(mode="json", exclude_unset=True))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"sha256": hashlib.sha256(bytes(value)).hexdigest()}
    if isinstance(value, os.PathLike):
        return {"sha256": hashlib.sha256(Path(value).read_bytes()).hexdigest()}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):
        return value.value  # enums
    return value


def _readable(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """File objects read into bytes once, so the recording can hash them and the client still gets them."""
    return tuple(v.read() if hasattr(v, "read") and not isinstance(v, (bytes, str)) else v for v in args)


def request_key(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    return json.dumps({"method": method, "args": _canonical(list(args)), "kwargs": _canonical(kwargs)},
                      sort_keys=True, default=str)


# -- values ------------------------------------------------------------------------------------

def _encode(value: Any) -> Any:
    if isinstance(value, BaseModel):
        cls = type(value)
        return {"$model": f"{cls.__module__}:{cls.__qualname__}", "data": value.model_dump(mode="json")}
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {"$dict": {str(k): _encode(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "$bytes" in value:
        return base64.b64decode(value["$bytes"])
    if "$dict" in value:
        return {k: _decode(v) for k, v in value["$dict"].items()}
    cls = allowed_class(value.get("$model"), BaseModel)
    try:
        return cls.model_validate(value.get("data"))
    except pydantic.ValidationError as exc:
        raise CassetteError(f"a recorded {cls.__name__} does not validate: {exc}") from None


@functools.cache
def _allowlist() -> dict[str, type]:
    """``module:Class`` -> class, for every pydantic model and SDK error defined in ALLOWED_MODULES."""
    found: dict[str, type] = {}
    for module_name in ALLOWED_MODULES:
        module = importlib.import_module(module_name)   # a name from the list above, never from a file
        for name, obj in vars(module).items():
            if isinstance(obj, type) and obj.__module__ == module_name and issubclass(obj, (BaseModel,
                                                                                            sdk.PolarGridError)):
                found[f"{module_name}:{name}"] = obj
    return found


def allowed_class(name: Any, base: type) -> Any:
    """The class a cassette names, if the allowlist holds it and it is a ``base``; else CassetteError."""
    cls = _allowlist().get(name) if isinstance(name, str) else None
    if cls is None or not issubclass(cls, base):
        what = "a pydantic type of polargrid or polargrid_local" if base is BaseModel else \
            "an error class of polargrid or polargrid_local"
        raise CassetteError(f"{str(name)[:200]!r} is not a type a cassette may hold: only {what} "
                            f"(from {', '.join(ALLOWED_MODULES)}) is replayed; nothing else is imported")
    return cls


def _encode_error(exc: BaseException) -> dict[str, Any]:
    cls = type(exc)
    attrs = {k: v for k, v in vars(exc).items() if _jsonable(v)}
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "attrs": attrs}


def _decode_error(data: dict[str, Any]) -> BaseException:
    cls = allowed_class(data.get("class"), sdk.PolarGridError)
    raw = data.get("attrs")
    attrs: dict[str, Any] = raw if isinstance(raw, dict) else {}
    exc = cls.__new__(cls)
    Exception.__init__(exc, attrs.get("message", ""))
    exc.__dict__.update({"message": str(attrs.get("message", "")), "request_id": None})  # what __str__ reads
    exc.__dict__.update({str(k): v for k, v in attrs.items() if not str(k).startswith("__")})
    return exc


def _names_in(value: Any) -> Iterator[str]:
    """Every ``$model`` name inside an encoded value."""
    if isinstance(value, list):
        for item in value:
            yield from _names_in(item)
    elif isinstance(value, dict):
        if "$model" in value:
            yield value["$model"]
        elif "$dict" in value and isinstance(value["$dict"], dict):
            for item in value["$dict"].values():
                yield from _names_in(item)


def check_interactions(cassette: Cassette) -> None:
    """Refuse (CassetteError, naming the file) any cassette that names a type outside the allowlist."""
    try:
        for entry in cassette.interactions:
            for name in _names_in([entry.get("result"), *(entry.get("chunks") or [])]):
                allowed_class(name, BaseModel)
            if entry.get("error") is not None:
                allowed_class(entry["error"].get("class"), sdk.PolarGridError)
    except CassetteError as exc:
        raise CassetteError(f"cassette {cassette.path}: {exc}") from None
    except (AttributeError, TypeError) as exc:
        raise CassetteError(f"cassette {cassette.path} is not shaped like a recording ({exc})") from None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# -- recording -----------------------------------------------------------------------------------

class Recorder:
    """Calls go to the wrapped client; each call and its answer (or SDK error) goes to the cassette."""

    def __init__(self, client: Any, cassette: Cassette) -> None:
        self._client = client
        self._cassette = cassette

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if name.startswith("_") or name in _PASS_THROUGH or not callable(target):
            return target
        if inspect.isasyncgenfunction(target):
            return self._async_stream(name, target)
        if inspect.iscoroutinefunction(target):
            return self._async_call(name, target)
        return self._sync_call(name, target)

    def _entry(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], kind: str) -> dict[str, Any]:
        return {"method": name, "key": request_key(name, args, kwargs), "kind": kind, "result": None,
                "chunks": [], "error": None}

    def _sync_call(self, name: str, target: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            args = _readable(args)
            entry = self._entry(name, args, kwargs, "call")
            try:
                result = target(*args, **kwargs)
            except sdk.PolarGridError as exc:
                entry["error"] = _encode_error(exc)
                self._cassette.add(entry)
                raise
            if hasattr(result, "__next__"):
                entry["kind"] = "stream"
                return self._sync_chunks(result, entry)
            entry["result"] = _encode(result)
            self._cassette.add(entry)
            return result

        return call

    def _sync_chunks(self, stream: Iterator[Any], entry: dict[str, Any]) -> Iterator[Any]:
        try:
            for chunk in stream:
                entry["chunks"].append(_encode(chunk))
                yield chunk
        except sdk.PolarGridError as exc:
            entry["error"] = _encode_error(exc)
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
            self._cassette.add(entry)

    def _async_call(self, name: str, target: Any) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            args = _readable(args)
            entry = self._entry(name, args, kwargs, "call")
            try:
                result = await target(*args, **kwargs)
            except sdk.PolarGridError as exc:
                entry["error"] = _encode_error(exc)
                self._cassette.add(entry)
                raise
            entry["result"] = _encode(result)
            self._cassette.add(entry)
            return result

        return call

    def _async_stream(self, name: str, target: Any) -> Any:
        async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            args = _readable(args)
            entry = self._entry(name, args, kwargs, "stream")
            try:
                async for chunk in target(*args, **kwargs):
                    entry["chunks"].append(_encode(chunk))
                    yield chunk
            except sdk.PolarGridError as exc:
                entry["error"] = _encode_error(exc)
                raise
            finally:
                self._cassette.add(entry)

        return stream


# -- replaying -------------------------------------------------------------------------------------

class Replayer:
    """The recorded answers, in the client's shape (sync or async, streams as iterators)."""

    def __init__(self, cassette: Cassette) -> None:
        check_interactions(cassette)
        self._cassette = cassette
        self._answers: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self._used: dict[str, int] = defaultdict(int)
        self._kinds: dict[str, str] = {}
        for entry in cassette.interactions:
            self._answers[entry["key"]].append(entry)
            self._kinds[entry["method"]] = entry["kind"]

    def close(self) -> None:
        """Nothing to release."""

    async def aclose(self) -> None:
        """Nothing to release."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        stream = self._kinds.get(name, "stream" if name.endswith("_stream") else "call") == "stream"
        if self._cassette.asynchronous:
            return self._async_stream(name) if stream else self._async_call(name)
        return self._sync_stream(name) if stream else self._sync_call(name)

    def _next(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        key = request_key(name, _readable(args), kwargs)
        answers = self._answers.get(key)
        if not answers:
            held = sum(1 for e in self._cassette.interactions if e["method"] == name)
            raise CassetteMiss(f"cassette {self._cassette.path} holds no answer for {name}({_summary(key)}); "
                               f"it holds {held} other {name} call(s). Record again to add it.")
        index = min(self._used[key], len(answers) - 1)
        self._used[key] += 1
        return answers[index]

    def _result(self, entry: dict[str, Any]) -> Any:
        if entry["error"] is not None:
            raise _decode_error(entry["error"])
        return _decode(entry["result"])

    def _chunks(self, entry: dict[str, Any]) -> Iterator[Any]:
        for chunk in entry["chunks"]:
            yield _decode(chunk)
        if entry["error"] is not None:
            raise _decode_error(entry["error"])

    def _sync_call(self, name: str) -> Any:
        return lambda *args, **kwargs: self._result(self._next(name, args, kwargs))

    def _sync_stream(self, name: str) -> Any:
        return lambda *args, **kwargs: self._chunks(self._next(name, args, kwargs))

    def _async_call(self, name: str) -> Any:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return self._result(self._next(name, args, kwargs))

        return call

    def _async_stream(self, name: str) -> Any:
        async def stream(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
            for chunk in self._chunks(self._next(name, args, kwargs)):
                yield chunk

        return stream


def _summary(key: str) -> str:
    data = json.loads(key)
    text = json.dumps({"args": data["args"], "kwargs": data["kwargs"]}, sort_keys=True)[1:-1]
    return text if len(text) <= 300 else text[:297] + "..."
