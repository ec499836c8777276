"""The shape of the package, kept by tests as well as by `make lint`: no import circles, and runtime/ below
the engine, the HTTP server and the test kit (scripts/import_graph.py reads the graph from the sources)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

ABOVE_THE_RUNTIME = ("engine", "client", "admin", "server", "testing", "cli")


def test_no_module_imports_itself_back_at_module_level():
    """TYPE_CHECKING imports count: they tell a reader the same thing."""
    assert import_graph.circles(import_graph.graph()) == []


def test_the_runtime_imports_nothing_above_it_not_even_lazily():
    edges = import_graph.graph(lazy=True)
    upward = sorted((source, target) for source, targets in edges.items() if import_graph.area(source) == "runtime"
                    for target in targets if import_graph.area(target) in ABOVE_THE_RUNTIME)
    assert upward == []


def test_the_product_imports_the_test_kit_only_where_an_engine_is_asked_for_fakes():
    edges = import_graph.graph(lazy=True)
    into_testing = sorted(source for source, targets in edges.items() if import_graph.area(source) != "testing"
                          for target in targets if import_graph.area(target) == "testing")
    assert into_testing == ["polargrid_local.engine"]   # LocalEngine(fake=True): the factories seam
