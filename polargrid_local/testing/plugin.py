"""pytest plugin for applications built on PolarGrid (registered through the ``pytest11`` entry point).

Fixtures: ``polargrid`` (async client), ``polargrid_sync``, ``polargrid_server`` (the HTTP facade on a
free loopback port: ``.base_url`` for polargrid-sdk, ``.openai_base_url`` for openai), ``polargrid_fake``
(the script, reset before each test) and ``polargrid_engine`` (the session's LocalEngine). All of them
run on the fake engines unless ``--polargrid-real`` is given; ``--polargrid-offline`` turns the offline
guard on for the session. ``@pytest.mark.polargrid(replies={pattern: reply})`` scripts one test.

This module imports nothing heavy: it is loaded in every pytest run of an environment that has
polargrid_local installed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

MARKER = "polargrid"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("polargrid", "polargrid_local test kit")
    group.addoption("--polargrid-real", action="store_true", default=False,
                    help="run the polargrid fixtures on the real models instead of the fake engines")
    group.addoption("--polargrid-offline", action="store_true", default=False,
                    help="refuse every non-loopback connection for the whole session (the offline guard)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "polargrid(replies=None, echo=False, transcript=None): script the fake engines for one test; "
                   "replies maps a regex to a reply (str or dict), stream pieces (list) or an error to raise. "
                   "Ignored with --polargrid-real.")
    if config.getoption("--polargrid-offline", default=False):
        from polargrid_local.host import offline

        offline.enable()


@dataclass
class PolarGridServer:
    """The HTTP facade a test talks to: the same routes as PolarGrid's service, on loopback."""

    url: str
    engine: Any

    @property
    def base_url(self) -> str:
        """For ``polargrid.PolarGrid(base_url=...)`` (and raw HTTP)."""
        return self.url

    @property
    def openai_base_url(self) -> str:
        """For ``openai.OpenAI(base_url=...)``."""
        return self.url + "/v1"


@pytest.fixture(scope="session")
def polargrid_engine(request: pytest.FixtureRequest):
    """One LocalEngine for the session: fake engines, or the real models with --polargrid-real."""
    from polargrid_local import LocalEngine

    engine = LocalEngine() if request.config.getoption("--polargrid-real") else LocalEngine(fake=True)
    yield engine
    engine.close()


@pytest.fixture
def _polargrid_script(polargrid_engine, request: pytest.FixtureRequest):
    """Reset the fakes, then apply the test's polargrid marker (a no-op on the real models)."""
    fake = polargrid_engine.fake
    if fake is not None:
        fake.reset()
        for marker in reversed(list(request.node.iter_markers(MARKER))):
            apply_marker(fake, **marker.kwargs)
    yield fake
    if fake is not None:
        fake.reset()


def apply_marker(fake, replies: dict[str, Any] | None = None, echo: bool = False, transcript: str | None = None,
                 **unknown: Any) -> None:
    if unknown:
        raise TypeError(f"polargrid marker: unknown arguments {sorted(unknown)}")
    for pattern, reply in (replies or {}).items():
        if isinstance(reply, BaseException):
            fake.chat.fail(pattern, reply)
        elif isinstance(reply, (list, tuple)):
            fake.chat.stream(pattern, reply)
        else:
            fake.chat.reply(pattern, reply)
    if echo:
        fake.chat.echo()
    if transcript is not None:
        fake.stt.transcript(transcript)


@pytest.fixture
def polargrid_fake(_polargrid_script):
    """The fake engines' script (FakeScript) for this test; skips the test with --polargrid-real."""
    if _polargrid_script is None:
        pytest.skip("scripts the fake engines; the real models (--polargrid-real) cannot be scripted")
    return _polargrid_script


@pytest.fixture
def polargrid_sync(polargrid_engine, _polargrid_script):
    """A PolarGridSync on the session's engine."""
    from polargrid_local import PolarGridSync

    return PolarGridSync(engine=polargrid_engine)


@pytest.fixture
def polargrid(polargrid_engine, _polargrid_script):
    """An async PolarGrid on the session's engine (use it from an async test, or with asyncio.run)."""
    from polargrid_local import PolarGrid

    return PolarGrid(engine=polargrid_engine)


@pytest.fixture(scope="session")
def _polargrid_http(polargrid_engine):
    from polargrid_local.server import running

    with running(polargrid_engine) as server:
        yield server


@pytest.fixture
def polargrid_server(_polargrid_http, polargrid_engine, _polargrid_script) -> PolarGridServer:
    """The HTTP facade on a free loopback port, serving the session's engine."""
    return PolarGridServer(_polargrid_http.url, polargrid_engine)
