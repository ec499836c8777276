"""Our clients keep the SDK's shape: every public method of polargrid.PolarGrid and polargrid.PolarGridSync
exists on ours with the same parameter names, order, kinds and defaults, and the same sync/async nature.
Local extras may only follow the SDK's parameters, keyword-only."""
from __future__ import annotations

import inspect

import polargrid
import pytest

import polargrid_local

PAIRS = [(polargrid.PolarGrid, polargrid_local.PolarGrid), (polargrid.PolarGridSync, polargrid_local.PolarGridSync)]
EXTRA_KINDS = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)


def public_methods(cls) -> list[str]:
    return sorted(name for name, value in inspect.getmembers(cls)
                  if callable(value) and (not name.startswith("_") or name == "__init__"))


def nature(cls, name: str) -> str:
    raw = inspect.getattr_static(cls, name)
    function = raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
    kind = ("async generator" if inspect.isasyncgenfunction(function) else
            "coroutine" if inspect.iscoroutinefunction(function) else "sync")
    binding = type(raw).__name__ if isinstance(raw, (classmethod, staticmethod)) else "method"
    return f"{binding}, {kind}"


def sdk_signature(sdk_cls, name: str) -> inspect.Signature:
    """The SDK's signature; the sync client's (*args, **kwargs) wrappers stand for the async method they call."""
    signature = inspect.signature(getattr(sdk_cls, name))
    kinds = [p.kind for p in signature.parameters.values()]
    if sdk_cls is polargrid.PolarGridSync and inspect.Parameter.VAR_POSITIONAL in kinds:
        return inspect.signature(getattr(polargrid.PolarGrid, name))
    return signature


def describe(parameter: inspect.Parameter) -> tuple:
    return parameter.name, parameter.kind, parameter.default


@pytest.mark.parametrize("sdk_cls, ours", PAIRS, ids=["PolarGrid", "PolarGridSync"])
def test_every_sdk_method_exists_with_the_same_nature(sdk_cls, ours):
    missing = [name for name in public_methods(sdk_cls) if not hasattr(ours, name)]
    assert not missing, f"{ours.__name__} lacks the SDK's {missing}"
    for name in public_methods(sdk_cls):
        if name != "__init__":
            assert nature(ours, name) == nature(sdk_cls, name), name


@pytest.mark.parametrize("sdk_cls, ours", PAIRS, ids=["PolarGrid", "PolarGridSync"])
def test_every_sdk_method_has_the_same_parameters_then_keyword_only_extras(sdk_cls, ours):
    problems = []
    for name in public_methods(sdk_cls):
        theirs = [describe(p) for p in sdk_signature(sdk_cls, name).parameters.values()]
        mine = list(inspect.signature(getattr(ours, name)).parameters.values())
        if [describe(p) for p in mine[:len(theirs)]] != theirs:
            problems.append(f"{name}: SDK {theirs}, ours {[describe(p) for p in mine[:len(theirs)]]}")
        extras = [p.name for p in mine[len(theirs):] if p.kind not in EXTRA_KINDS]
        if extras:
            problems.append(f"{name}: local extras {extras} must be keyword-only")
    assert not problems, "\n".join(problems)


def test_sdk_positional_construction_and_session_accessors():
    engine = polargrid_local.LocalEngine()
    try:
        client = polargrid_local.PolarGridSync("pg_key", "http://127.0.0.1:9", None, None, 5.0, 0, False, True,
                                               engine=engine)
        first = client.get_session_id()
        assert first and first == client.get_session_id()
        assert client.get_refresh_token() is None
        client.set_refresh_token("rt-1")
        assert client.get_refresh_token() == "rt-1"
        client.invalidate_session()
        assert client.get_refresh_token() is None and client.get_session_id() not in (None, first)
        with pytest.raises(TypeError):
            polargrid_local.PolarGridSync("k", "u", None, None, 5.0, 0, False, True, engine)  # extras: keywords only
    finally:
        engine.close()


def test_create_takes_the_sdk_arguments_positionally():
    import asyncio

    engine = polargrid_local.LocalEngine()

    async def main():
        client = await polargrid_local.PolarGrid.create("pg_key", None, None, "local", 5.0, 0, False, False,
                                                        "global", "any-model", engine=engine)
        return client.get_region_id(), client.get_session_id()

    try:
        region, session = asyncio.run(main())
        assert region == "local" and session
    finally:
        engine.close()
