"""Imports go one way: no module of ipt_hpc reaches itself again through its imports (module-level or
inside functions), read from the source without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ipt_hpc"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The ipt_hpc modules ``name`` imports (``from .x import y`` counts ``x.y`` when that is a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found |= {f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names}
    return {m for m in found if m in known and m != name}


def cycle_through(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    """A path of imports from ``start`` back to itself, if there is one (depth-first)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(graph[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_the_walk_sees_imports() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    assert "ipt_hpc.execution.state" in graph["ipt_hpc.execution.shards"]  # module level, relative
    assert "ipt_hpc.model.train.loop" in graph["ipt_hpc.model.train.stage"]  # inside a function
    assert cycle_through("a", {"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_no_import_circles() -> None:
    known = modules()
    graph = {name: imports(name, path, known) for name, path in known.items()}
    circles = [" -> ".join(c) for name in sorted(graph) if (c := cycle_through(name, graph))]
    assert not circles, "import circles:\n" + "\n".join(circles)


# the layers, lowest first: a module imports from its own layer or the ones below it, never above
LAYERS = [
    ("base", ("ipt_hpc", "atomic", "errors", "config", "layout", "records", "indexed", "charts", "timeline")),
    ("execution", ("execution",)),
    ("stages", ("stages",)),
    ("model", ("model",)),
    ("above the stages", ("pipeline", "status", "report", "preflight", "doctor", "planning")),
    ("cli", ("cli", "launch")),
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for rank, (_, names) in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module}: in no layer; add it to LAYERS")


def test_imports_point_down() -> None:
    known = modules()
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, path in sorted(known.items())
        for dep in sorted(imports(name, path, known))
        if layer_of(dep) > layer_of(name)
    ]
    assert not upward, "imports pointing up:\n" + "\n".join(upward)
