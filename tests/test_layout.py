"""The package layout is the architecture: no import cycles, and each layer imports only the layers below it.

Read from the source with ``ast`` (every ``import``/``from`` statement, also those inside functions), so the test
needs no import side effects and names the offending file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "moe_variants"

# layer -> the project layers it may import (besides itself and moe_variants.paths); see each package's docstring
ALLOWED = {
    "model": set(),
    "routers": {"model"},
    "data": set(),
    "parallel": {"model"},
    "analysis": {"model", "routers", "data", "training"},  # analysis.analyze loads checkpoints, reads word spans
    "training": {"model", "routers", "data", "parallel", "analysis"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> list[tuple[str, int]]:
    """(imported moe_variants module, line) for every import statement of the file; ``from a import b`` counts
    ``a.b`` when that is a module of the package, else ``a``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("moe_variants")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_variants"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                is_module = (PKG.parent / sub.replace(".", "/")).with_suffix(".py").is_file() or (
                    PKG.parent / sub.replace(".", "/") / "__init__.py").is_file()
                out.append((sub if is_module else node.module, node.lineno))
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PKG.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target, _ in project_imports(p):
            if target in modules and target != m:
                edges[m].add(target)
    return edges


def test_no_import_cycle_between_modules():
    edges = graph()
    # ancestors' __init__ run before a submodule: an edge to a package's own parent is not a cycle of ours
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_layers_import_only_downwards():
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).parts
        if len(rel) < 2:
            continue  # moe_variants/__init__.py and paths.py
        layer = rel[0]
        for target, line in project_imports(p):
            parts = target.split(".")
            if len(parts) < 2 or parts[1] in (layer, "paths"):
                continue
            if parts[1] not in ALLOWED.get(layer, set()):
                bad.append(f"{p.relative_to(PKG.parent)}:{line} ({layer}) imports {target}")
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_layout_test_sees_the_layers():
    """Guard against a vacuous pass: every layer of ALLOWED is a package with modules."""
    for layer in ALLOWED:
        assert (PKG / layer / "__init__.py").is_file(), layer
    assert len(graph()) > 25
