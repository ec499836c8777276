"""The module-level import graph of polargrid_local: circles, and which subpackage imports which.

Module level means what runs when a module is imported: statements at the top of the file, inside
``if``/``try`` blocks there (``if TYPE_CHECKING:`` included), but not inside functions or classes (the
lazy imports that keep start-up fast). Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``,
so those count as imported too, except a module's own packages (already running when it runs).

    python scripts/import_graph.py            # circles (strongly connected groups), then arrows by package
    python scripts/import_graph.py --json     # the same as JSON
    python scripts/import_graph.py --lazy     # imports inside functions counted too
    python scripts/import_graph.py --check    # exit 1 if there is any module-level circle (make lint)
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "polargrid_local"
# kernels/ at the repo root installs as polargrid_local.kernels
SOURCES = {PACKAGE: ROOT / "polargrid_local", f"{PACKAGE}.kernels": ROOT / "kernels"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found: dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _module_level(tree: ast.Module, lazy: bool = False):
    """Import statements that run at import time (not inside a def or class); with ``lazy``, every import."""
    if lazy:
        yield from (node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.If, ast.Try, ast.With)) or type(node).__name__ == "TryStar":
            for field in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(node, field, []) or []:
                    stack.extend(child.body if isinstance(child, ast.ExceptHandler) else [child])


def _with_parents(name: str, known: dict[str, Path]) -> set[str]:
    """``name`` and each package above it that is ours (their __init__ runs first)."""
    out, parts = set(), name.split(".")
    for i in range(1, len(parts) + 1):
        candidate = ".".join(parts[:i])
        if candidate in known:
            out.add(candidate)
    return out


def _ancestors(name: str) -> set[str]:
    """The module itself and the packages above it. Their ``__init__`` has already started when the module
    runs, so importing from them (``from . import x``, or a sibling through them) is no dependency."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> the package modules it imports at module level (parent packages included); with ``lazy``,
    the imports inside functions too."""
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in _module_level(tree, lazy):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # ``from pkg import name``: name may be a submodule (``from . import admin``)
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                if target.split(".")[0] == PACKAGE:
                    edges[name] |= _with_parents(target, known) - _ancestors(name)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(groups, key=len, reverse=True)


def area(module: str) -> str:
    """The subpackage a module belongs to (``polargrid_local.runtime.pool`` -> ``runtime``); top-level modules
    are their own area."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(package)"


def package_arrows(edges: dict[str, set[str]]) -> dict[str, list[str]]:
    """Area -> the other areas it imports at module level."""
    out: dict[str, set[str]] = defaultdict(set)
    for source, targets in edges.items():
        for target in targets:
            if area(source) != area(target) and target != PACKAGE:
                out[area(source)].add(area(target))
    return {k: sorted(v) for k, v in sorted(out.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--lazy", action="store_true", help="count imports inside functions too")
    parser.add_argument("--check", action="store_true", help="exit 1 when there is a circle")
    args = parser.parse_args()
    edges = graph(args.lazy)
    found = circles(edges)
    if args.check:
        for group in found:
            print("import circle: " + " -> ".join(group), file=sys.stderr)
        raise SystemExit(1 if found else 0)
    arrows = package_arrows(edges)
    if args.json:
        print(json.dumps({"modules": len(edges), "imports": sum(map(len, edges.values())), "circles": found,
                          "areas": arrows}, indent=1))
        return
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} module-level imports")
    print(f"{len(found)} circle(s)")
    for group in found:
        print(f"  {len(group)}: " + ", ".join(m.removeprefix(PACKAGE + ".") for m in group))
    print("areas:")
    for source, targets in arrows.items():
        print(f"  {source} -> {', '.join(targets)}")


if __name__ == "__main__":
    main()
