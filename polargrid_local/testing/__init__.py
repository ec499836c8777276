"""Test kit: deterministic fake engines for every model kind, faults on demand, record/replay, a pytest plugin."""
from .cassette import Cassette, CassetteError, CassetteMiss
from .chat import ScriptError
from .factories import fake_factories
from .script import FakeScript, Rule

__all__ = ["Cassette", "CassetteError", "CassetteMiss", "FakeScript", "Rule", "ScriptError", "fake_factories"]
