"""No two modules of polypure import each other, directly or through others.

Every import counts, at module level or inside a function: a lazy import only hides a cycle from the
interpreter, not from a reader who has to understand both modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import polypure

PACKAGE = Path(polypure.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Polypure modules imported anywhere in a file (``from . import x`` counts as importing ``x``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("polypure")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("polypure"):
                continue
            for alias in node.names:
                # ``from .pkg import module`` imports the module, ``from .module import name`` the module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                          or (PACKAGE.parent / candidate.replace(".", "/")).is_dir() else target)
    return found - {name}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    # the package's own __init__ re-exports lazily by name and is not a dependency of its modules
    return {name: {m for m in imports(path) if m in modules and m != "polypure"}
            for name, path in modules.items() if name != "polypure"}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_polypure():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_no_two_modules_share_a_name():
    # a module's name says what it holds, once: topk.py and a topk stage would be read as one thing
    stems = [p.stem for p in PACKAGE.rglob("*.py") if p.stem not in ("__init__", "__main__")]
    repeated = sorted({s for s in stems if stems.count(s) > 1})
    assert repeated == [], f"module names used twice: {repeated}"
    packages = {p.parent.name for p in PACKAGE.rglob("__init__.py")} - {PACKAGE.name}
    assert not packages & set(stems), f"a module named like a subpackage: {sorted(packages & set(stems))}"
