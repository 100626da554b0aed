"""The layering rules of docs/architecture.md, checked on the source.

Every ``import`` of a shoal module is read with :mod:`ast` (top-level, inside
functions and under ``TYPE_CHECKING`` alike: a dependency is a dependency), and:

* each layer imports only the layers it may (``ALLOWED``);
* no daemon package imports another daemon package;
* the sans-IO layers (protocol, core) import no I/O module;
* the import graph between shoal modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: import name prefix -> folder (pyproject's package-dir)
FOLDERS = {
    "shoal.protocol": "protocol",
    "shoal.core": "core",
    "shoal.daemons": "daemons",
    "shoal.ckpt": "ckpt",
    "shoal.demo": "demo",
    "shoal.lab": "lab",
    "shoal.cli": "cli",
}
DAEMONS = ("tracker", "peer", "telemetry", "fedserver", "checkpoint", "dispatcher", "worker")
IO_MODULES = {"trio", "socket", "subprocess", "sqlite3", "asyncio", "threading", "selectors"}


def layer(module: str) -> str:
    """'protocol', 'core', 'runtime', 'daemon:<name>', 'ckpt', 'demo', 'lab' or 'cli'."""
    parts = module.split(".")
    if parts[1] == "daemons":
        if len(parts) == 2:
            return "daemons"
        return "runtime" if parts[2] == "runtime" else f"daemon:{parts[2]}"
    return parts[1]


#: who may import whom; a daemon may also import itself
ALLOWED = {
    "protocol": {"protocol"},
    "core": {"protocol", "core"},
    "runtime": {"protocol", "runtime"},
    "daemons": {"protocol", "runtime"},
    "daemon": {"protocol", "core", "runtime"},
    "ckpt": {"protocol", "core", "runtime", "ckpt"},
    "demo": None,  # anything: the tour drives every daemon
    "lab": None,
    "cli": None,
}


def modules() -> dict[str, Path]:
    found = {}
    for prefix, folder in FOLDERS.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([prefix, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported shoal module, line) pairs; ``from a import b`` is a.b when that is a module."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (ruff TID252 should catch it)"
            base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub if sub in known else base, node.lineno))
    return out


def graph() -> tuple[dict[str, Path], dict[str, set[str]], list[tuple[str, str, int]]]:
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    raw = []
    for name, path in mods.items():
        for target, line in imports_of(name, path, known):
            raw.append((name, target, line))
            if target in known and target != name:
                edges[name].add(target)
    return mods, edges, raw


def test_layers_import_only_what_they_may():
    mods, _, raw = graph()
    bad = []
    for src, target, line in raw:
        if not target.startswith("shoal."):
            continue
        s, t = layer(src), layer(target)
        kind = "daemon" if s.startswith("daemon:") else s
        allowed = ALLOWED[kind]
        if allowed is None or t == s:
            continue
        t_kind = "daemon" if t.startswith("daemon:") else t
        if t_kind == "daemon" or t not in allowed:
            bad.append(f"{mods[src].relative_to(ROOT)}:{line}: {s} imports {target} ({t})")
    assert not bad, "layering broken:\n" + "\n".join(bad)


def test_sans_io_layers_do_no_io():
    mods, _, raw = graph()
    bad = [f"{mods[src].relative_to(ROOT)}:{line}: imports {target}"
           for src, target, line in raw
           if layer(src) in ("protocol", "core") and target.split(".")[0] in IO_MODULES]
    assert not bad, "I/O in a sans-IO layer:\n" + "\n".join(bad)


def test_no_import_cycles():
    _, edges, _ = graph()
    # Tarjan's strongly connected components
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            # a package's __init__ re-exporting its modules is not a cycle of design
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_every_package():
    mods = modules()
    for daemon in DAEMONS:
        assert f"shoal.daemons.{daemon}" in mods
    assert len(mods) > 100
